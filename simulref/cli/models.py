"""``simulref models``: the model presets, which are cached, and the cache itself."""

from __future__ import annotations

from simulref.cli.output import stdout_console


def add_models(subparsers) -> None:
    p = subparsers.add_parser("models", help="list model presets and which are cached",
                              description="List model presets, where they are cached, sizes.")
    p.set_defaults(run=run_models)


def preset_rows() -> list[dict]:
    """Name, description, size, cache path and whether it is cached, per preset."""
    from simulref import models

    rows = []
    for name, preset in models.PRESETS.items():
        path = models.cache_dir() / preset.filename
        cached = path.is_file() and path.stat().st_size == preset.size
        rows.append({"name": name, "default": name == models.DEFAULT_PRESET,
                     "cached": cached, "size": preset.size, "path": path,
                     "description": preset.description})
    return rows


def run_models(args) -> int:
    from rich.table import Table

    from simulref import models

    table = Table(title="simulref model presets", title_justify="left")
    table.add_column("preset", no_wrap=True)
    table.add_column("cached")
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("description")
    for row in preset_rows():
        table.add_row(row["name"] + (" (default)" if row["default"] else ""),
                      "yes" if row["cached"] else "no", _size(row["size"]),
                      row["description"])
    from simulref import download

    console = stdout_console()
    console.print(table)
    directory = models.cache_dir()
    freed = download.clean_stale_downloads(directory)
    if freed:
        console.print(f"removed {_size(freed)} left by interrupted downloads")
    size = _size(download.cache_size(directory)) or "empty"
    console.print(f"cache: {directory} ({size}; set SIMULREF_HOME to move it)", soft_wrap=True)
    from simulref.adapters import ADAPTER_PRESETS

    for name, preset in ADAPTER_PRESETS.items():
        console.print(f"adapter preset: {name}: {preset.description} (--model {name} loads "
                      f"{preset.base} with its LoRA)", soft_wrap=True)
    console.print("--model also takes a GGUF file, an mlx-lm model directory or a repo "
                  "name (org/name).", soft_wrap=True)
    return 0


def _size(n: int | None) -> str:
    if not n:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""
