#ifndef COUNTER_H
#define COUNTER_H

class Counter {
public:
    int step(int x);
    int total() const { return total_; }

private:
    int total_ = 0;
};

template <typename T>
__attribute__((noinline)) T twice(T x)
{
    return x > 1000 ? x : x * 2;
}

int checked(int x);

#endif
