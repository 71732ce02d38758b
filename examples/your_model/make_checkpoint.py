"""Train the dense model the study fine-tunes from and save it as ``dense.pt`` beside this file (a second or two).

    python -m examples.your_model.make_checkpoint
"""
from pathlib import Path

import torch

from examples.your_model.factories import wine, wine_mlp


def main(path: Path = Path(__file__).with_name("dense.pt")) -> Path:
    torch.manual_seed(0)
    train, _, _ = wine()
    model = wine_mlp(num_classes=3, input_shape=(13,))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = train.tensors
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(model.state_dict(), path)
    print(f"saved {path}")
    return path


if __name__ == "__main__":
    main()
