// Reads numbers on stdin, answers
// "counter.step(x) twice(x) shape->area(x) checked(x)" per line.
#include "counter.h"
#include "shape.h"
#include <cstdio>
#include <cstdlib>

int main()
{
    char line[64];
    Counter counter;
    Shape *shape = make_shape();
    std::setvbuf(stdout, nullptr, _IOLBF, 0);
    std::printf("ready\n");
    while (std::fgets(line, sizeof line, stdin)) {
        int x = std::atoi(line);
        std::printf("%d %d %d %d\n", counter.step(x), twice(x), shape->area(x), checked(x));
    }
    delete shape;
    return 0;
}
