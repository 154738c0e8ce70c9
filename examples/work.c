/* Linked into each program that uses it, so fib and compute are symbols of that executable. */
#include "work.h"

#include "groundtruth.h"

TRACED long fib(int n)
{
    struct gt_call call = gt_enter();
    long result = n < 2 ? n : fib(n - 1) + fib(n - 2);
    gt_exit("fib", &call);
    return result;
}

TRACED long compute(int n)
{
    struct gt_call call = gt_enter();
    long result = fib(n);
    gt_exit("compute", &call);
    return result;
}
