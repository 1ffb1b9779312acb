// Linked into the GPU test binaries of an AddressSanitizer build (tests/CMakeLists.txt).
// ASan's default protect_shadow_gap=1 reserves the address range the CUDA driver maps into, so
// cudaGetDeviceCount fails and every GPU test would skip as if there were no GPU. ASAN_OPTIONS
// given at run time still override this default.
extern "C" const char* __asan_default_options();
extern "C" const char* __asan_default_options() { return "protect_shadow_gap=0"; }
