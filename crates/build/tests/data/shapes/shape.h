#ifndef SHAPE_H
#define SHAPE_H

struct Shape {
    virtual ~Shape();
    virtual int area(int x) const = 0;
};

struct Square : Shape {
    int area(int x) const override;
};

Shape *make_shape();

#endif
