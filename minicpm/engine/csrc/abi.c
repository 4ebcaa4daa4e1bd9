/* The interface's identity, asked by minicpm/engine/cpu_kernels.py at load: the ABI version this
 * library was built from, the sizes of the structs it takes, and the constants both sides share
 * (see minicpm.h). */
#include "minicpm.h"

int minicpm_abi_version(void) { return MINICPM_ABI_VERSION; }

int64_t minicpm_struct_size(int which) {
    switch (which) {
    case MINICPM_STRUCT_LINEAR:
        return (int64_t)sizeof(minicpm_linear_t);
    case MINICPM_STRUCT_LAYER:
        return (int64_t)sizeof(minicpm_layer_t);
    default:
        return -1;
    }
}

int minicpm_constant(int which) {
    switch (which) {
    case 0:
        return MINICPM_PANEL;
    case 1:
        return MINICPM_MAX_PARTS;
    case 2:
        return MINICPM_MAX_HEAD_DIM;
    default:
        return -1;
    }
}
