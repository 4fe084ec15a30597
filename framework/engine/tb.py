"""Pictures for TensorBoard: a labelled confusion matrix and a grid of training samples."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def confusion_image(cm, classes: list[str], cell: int = 36) -> np.ndarray:
    """The confusion matrix as an RGB image (H, W, 3): rows = true class, columns = predicted, row-normalised colour."""
    cm = np.asarray(cm)
    n = len(classes)
    numbered = max(len(c) for c in classes) > 12  # long names (18 composite classes): columns by the rows' numbers
    short = [str(k) for k in range(n)] if numbered else classes
    names = [f"{k:>2} {c}" for k, c in enumerate(classes)] if numbered else classes  # full names, never cut
    cell = max(cell, 7 * max(len(c) for c in short) + 8)
    label_w = 8 + 7 * max(len(c) for c in names)
    top = 24
    header = "predicted ->   (rows: true class" + (", numbered as the columns)" if numbered else ")")
    img = Image.new("RGB", (max(label_w + n * cell + 4, label_w + 7 * len(header)), top + n * cell + 20), "white")
    draw = ImageDraw.Draw(img)
    rows = cm.sum(1, keepdims=True).clip(min=1)
    frac = cm / rows
    for t in range(n):
        draw.text((4, top + t * cell + cell // 2 - 5), names[t], fill="black")
        for p in range(n):
            shade = int(255 - 200 * frac[t, p])
            x0, y0 = label_w + p * cell, top + t * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=(shade, shade, 255), outline="gray")
            draw.text((x0 + 4, y0 + cell // 2 - 5), str(int(cm[t, p])), fill="black" if shade > 120 else "white")
    draw.text((label_w, 6), header, fill="black")
    for p in range(n):
        draw.text((label_w + p * cell + 4, top + n * cell + 4), short[p], fill="black")
    return np.asarray(img)


def sample_grid(images, names: list[str], cols: int = 8) -> np.ndarray:
    """uint8 tensors (3, H, W) with their class names underneath, as one RGB image."""
    arrs = [np.asarray(im.permute(1, 2, 0)) for im in images]
    h, w = arrs[0].shape[:2]
    scale = max(1, 64 // max(h, w))
    h, w = h * scale, w * scale
    cols = min(cols, len(arrs))
    rows = (len(arrs) + cols - 1) // cols
    grid = Image.new("RGB", (cols * (w + 4), rows * (h + 16)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (a, name) in enumerate(zip(arrs, names)):
        r, c = divmod(k, cols)
        tile = Image.fromarray(a).resize((w, h), Image.NEAREST)
        grid.paste(tile, (c * (w + 4), r * (h + 16)))
        draw.text((c * (w + 4) + 2, r * (h + 16) + h + 2), name[: max(3, w // 7)], fill="black")
    return np.asarray(grid)
