/* The shared library of the example: shows that probes on a .so work too. */
#include "greet.h"
#include "groundtruth.h"

#include <stdio.h>

TRACED
int greet(const char *name, char *out, size_t out_size)
{
    struct gt_call call = gt_enter();
    int len = snprintf(out, out_size, "Hello, %s!", name);
    gt_exit("greet", &call);
    return len;
}
