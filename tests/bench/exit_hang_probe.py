"""The exit path of fault 1 (issue 14) in a fraction of a second: a process that exits
while MLX's CPU thread still computes a chain of float32 matmuls (OpenBLAS calls, when it
is preloaded), as ``simulref translate`` exits with the decoder's last speculative
forward in flight. Run it many times with ``tests/bench/exit_hang.py``:

    python tests/bench/exit_hang.py --runs 500 --timeout 10 -- \\
        python -m simulref.blas python tests/bench/exit_hang_probe.py [--unfixed]

``--unfixed`` leaves out :func:`simulref.blas.register_drain_at_exit` (what
``simulref.load`` does), to see the hang the fix removes.
"""

import sys

import mlx.core as mx

if "--unfixed" not in sys.argv:
    from simulref.blas import register_drain_at_exit

    register_drain_at_exit()
n = 512
w = mx.random.normal((n, n)) / n**0.5
mx.eval(w)
y = w
for _ in range(20):
    y = y @ w
mx.async_eval(y)  # still running on MLX's CPU stream thread when the process exits
