/*
 * The sanitizer build's own check (fuzz/native.py): built with the flags the lane
 * is built with and loaded the same way, each function must abort the process with
 * a sanitizer report, or the build is not instrumented and fuzzing it proves nothing.
 */
#include <limits.h>
#include <stdlib.h>

/* Read byte i of an n-byte heap block: AddressSanitizer reports i >= n. */
int
canary_read(int n, int i)
{
    volatile char *p = calloc((size_t)n, 1);
    int v = p[i];
    free((void *)p);
    return v;
}

/* a + INT_MAX: UndefinedBehaviorSanitizer reports a signed overflow for a > 0. */
int
canary_overflow(int a)
{
    return a + INT_MAX;
}
