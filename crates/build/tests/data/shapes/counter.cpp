#include "counter.h"
#include <stdexcept>

namespace {
__attribute__((noinline)) int bump(int x)
{
    return x > 100 ? x - 100 : x + 1;
}
}

int Counter::step(int x)
{
    total_ += bump(x);
    return total_;
}

int checked(int x)
{
    try {
        if (x < 0)
            throw std::invalid_argument("negative");
        return twice(x);
    } catch (const std::invalid_argument &) {
        return -1;
    }
}
