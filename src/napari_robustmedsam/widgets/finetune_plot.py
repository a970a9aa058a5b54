"""The fine-tune tab's live curve: the training loss per iteration and the held-back Dice at every validation.

matplotlib in Qt (napari ships no plot widget); matplotlib is imported when the curve is first built, so the
dock opens without it.
"""

from __future__ import annotations

from qtpy.QtWidgets import QVBoxLayout, QWidget

#: the held-back Dice series drawn (trainer validation keys) and their legend names
DICE_SERIES = {"val_dice_clean_box": "Dice (box)", "val_dice_degraded_box": "Dice (box, LQ-3)"}


class FinetunePlot(QWidget):
    """Loss (left axis) and held-back Dice (right axis, 0-1) against the iteration."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(3.8, 2.1), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(170)
        self.ax = self.figure.add_subplot(111)
        self.ax_dice = self.ax.twinx()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self.clear()

    def clear(self) -> None:
        self.x: list[int] = []
        self.y: list[float] = []
        self.dice: dict[str, tuple[list[int], list[float]]] = {k: ([], []) for k in DICE_SERIES}
        self.boundaries: list[tuple[int, str]] = []
        self.redraw()

    def add(self, x: int, loss: float) -> None:
        """One training iteration."""
        self.x.append(int(x))
        self.y.append(float(loss))
        self.redraw()

    def add_validation(self, x: int, row: dict) -> None:
        """One validation on the held-back planes (epoch 0: before training)."""
        for key, (xs, ys) in self.dice.items():
            if row.get(key) is not None:
                xs.append(int(x))
                ys.append(float(row[key]))
        self.redraw()

    def mark_run(self, x: int, label: str) -> None:
        """A new training run starts at iteration ``x`` (folds)."""
        self.boundaries.append((int(x), label))

    def redraw(self) -> None:
        ax, ax2 = self.ax, self.ax_dice
        ax.clear()
        ax2.clear()
        if self.x:
            ax.plot(self.x, self.y, lw=1, color="#4a90d9", label="loss")
        ax.set_xlabel("iteration", fontsize=7)
        ax.set_ylabel("loss", fontsize=7, color="#4a90d9")
        ax.tick_params(labelsize=6)
        for (xs, ys), (key, name), colour in zip(self.dice.values(), DICE_SERIES.items(), ("#e8a33d", "#c0504d")):
            if xs:
                ax2.plot(xs, ys, marker="o", ms=3, lw=1, color=colour, label=name)
        for x, _label in self.boundaries[1:]:
            ax.axvline(x, color="#888888", lw=0.6, ls="--")
        ax2.set_ylim(0, 1)
        ax2.yaxis.tick_right()  # clear() puts a twin axis back on the left
        ax2.yaxis.set_label_position("right")
        ax2.set_ylabel("held-back Dice", fontsize=7, color="#e8a33d")
        ax2.tick_params(labelsize=6)
        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        if handles:
            ax2.legend(handles=handles, fontsize=6, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3,
                       frameon=False, handlelength=1.2, columnspacing=0.8)
        else:
            ax.text(0.5, 0.5, "the curve starts at the first iteration", ha="center", va="center",
                    transform=ax.transAxes, fontsize=7, color="#888888")
        self.canvas.draw_idle()
