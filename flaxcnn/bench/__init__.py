"""The benchmarks: `python -m flaxcnn.bench` (speed) and `python -m flaxcnn.bench.memory`.

    from flaxcnn import bench
    result = bench.benchmark("resnet20", image_size=32, steps=10)

`benchmark` loads jax and the trainer's pieces on first use, so that `flaxcnn.bench.memory`
starts without them. One job a module; each imports only modules listed above it:

    figures.py      one timed run's figures, the same keys for ours and for a reference
    flops.py        XLA's FLOPs of a compiled step, the devices' matrix-product peak
    twin_names.py   which networks have a PyTorch twin (no torch import: refused first)
    loop.py         --loop: the trainer's own loop on the digits (imported only then)
    torch_twins.py  --reference torch: the same networks in PyTorch (imported only then)
    planning.py     every argument checked and resolved (Plan) before anything compiles
    timing.py       our compiled steps timed, one architecture's result; benchmark()
    table.py        the printed table: columns, header and footer lines
    command.py      the command line (python -m flaxcnn.bench runs its main)
    memory.py       the memory check's estimate against measured peaks, a command of its own
"""

__all__ = ["benchmark"]


def __getattr__(name: str):
    if name == "benchmark":
        from flaxcnn.bench import timing

        return timing.benchmark
    raise AttributeError(f"module 'flaxcnn.bench' has no attribute {name!r}")
