"""The GPU backend's Python side: the process set-up (`device`: which backend, which device,
which stream) and the one loader over kernels/*.cu with the launches hpcattn needs (`cuda`)."""
