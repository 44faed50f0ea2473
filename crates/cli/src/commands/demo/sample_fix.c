/* sample_fix.c: the demo's patch of its sample service (the test fixtures
 * build it too, as `busy_fix`), built with gcc -O2 -g -fPIC -shared.
 * work_fn_v2 reads the service's static variable `scale`, work_fn_v3 calls its
 * static function `scaled`: both answer the original result + PATCH_MARK,
 * which the service's workers accept and count as "patched". */
extern long scale;
extern long scaled(long);

long work_fn_v2(long x) { return x * scale + 1 + 1000000L; }
long work_fn_v3(long x) { return scaled(x) + 1 + 1000000L; }
const char *banner_v2(void) { return "sample service v2 (live-patched)"; }
long tiny_v2(void) { return 1; }
long branchy_v2(long x) { return x; }
