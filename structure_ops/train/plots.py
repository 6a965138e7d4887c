"""PNG plots of a run (matplotlib, headless Agg backend, files written atomically)."""

from __future__ import annotations

from pathlib import Path

from .features import atomic_write


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))
    _figure().close(fig)


def layer_heatmap(scores, path) -> None:
    """Score of every (image layer, text layer) pair, best pair circled."""
    plt = _figure()
    s = scores.scores.numpy()
    fig, ax = plt.subplots(figsize=(1.6 + 0.45 * s.shape[1], 1.2 + 0.3 * s.shape[0]))
    im = ax.imshow(s, aspect="auto", cmap="viridis")
    ax.set_xticks(range(s.shape[1]), scores.text_layers, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(s.shape[0]), scores.image_layers, fontsize=7)
    ax.set_xlabel("text layer")
    ax.set_ylabel("image layer")
    bi, bt = scores.best()
    ax.scatter([scores.text_layers.index(bt)], [scores.image_layers.index(bi)], s=120, facecolors="none", edgecolors="red")
    k = f", k={scores.k}" if scores.k else ""
    ax.set_title(f"{scores.metric}{k}, n={scores.n}; best: {bi} × {bt}", fontsize=9)
    fig.colorbar(im, ax=ax)
    _save(fig, path)


def training_curves(runs: dict[str, list[dict]], path) -> None:
    """Train and validation loss per epoch for each named run (one history per run)."""
    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, hist in runs.items():
        ep = [h["epoch"] for h in hist]
        line = axes[0].plot(ep, [h["train_clip"] for h in hist], label=name)[0]
        axes[1].plot(ep, [h["val_loss"] for h in hist], color=line.get_color(), label=name)
    axes[0].set_title("train CLIP loss")
    axes[1].set_title("validation loss (CLIP + λ·STRUCTURE)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    _save(fig, path)


def metric_bars(table: dict[str, dict[str, tuple[float, float]]], path) -> None:
    """Grouped bars: ``table[config][metric] = (mean, std)``."""
    plt = _figure()
    configs = list(table)
    metrics = list(next(iter(table.values())))
    fig, ax = plt.subplots(figsize=(1.5 + 1.3 * len(metrics), 3.6))
    w = 0.8 / len(configs)
    for c, name in enumerate(configs):
        xs = [m + (c - (len(configs) - 1) / 2) * w for m in range(len(metrics))]
        ax.bar(xs, [table[name][m][0] for m in metrics], w, yerr=[table[name][m][1] for m in metrics], label=name, capsize=2)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    _save(fig, Path(path))
