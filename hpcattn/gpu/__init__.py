"""The GPU backend's Python side: the process set-up (`device`: which backend, which device,
which stream), the one loader over kernels/*.cu (`loader`), the kernels' shape table (`shapes`),
the host-side checks and encodings (`encode`) and the launches hpcattn needs (`forward`,
`listed`, `backward`, `merge`)."""
