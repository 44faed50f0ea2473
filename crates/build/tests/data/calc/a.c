/* compute(): the function the tests patch. */
#include <assert.h>

static int counter;
int limit = 10;

static int scale(int x)
{
    return x * 2;
}

int compute(int x)
{
    static int calls;
    calls++;
    counter++;
    assert(x < 1000000);
    return scale(x) + (calls > limit ? 0 : 0);
}
