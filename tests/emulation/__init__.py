"""CPU verification of the GPU kernels (README.md): the CUDA emulation layer and emulated builds of csrc/cuda/*.cu,
float64 models of the hardware's arithmetic (hardware.py), and a shuffled program order for the Triton interpreter
(triton_order.py)."""
