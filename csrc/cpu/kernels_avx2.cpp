// Compiled with the flags of one CPU capability (see setup.py); the code is in kernels.h.
#include "cpu/kernels.h"
