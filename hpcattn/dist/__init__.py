"""Distribution over ranks: the one communication layer that counts bytes (`comm`), how arrays
travel between ranks (`transport`: MPI, CUDA-aware MPI, NCCL, pinned host staging), and the
distribution variants (`variants/`: ring, burst, tree, sparse)."""
