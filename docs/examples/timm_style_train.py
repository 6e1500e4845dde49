"""ERM in a timm ``train.py``-style loop, then unlearning: the drop-in recipe of
docs/training.md, runnable end to end (``tests/test_docs.py`` runs it on a tiny setting).

The loop is the user's: their own ``Accelerator``, timm's optimizer and scheduler
factories, Mixup / CutMix with a soft-target loss, an EMA of the weights. erm-surgery adds
three things: ``attach`` before, ``erm_loss`` on ERM epochs (G has its own Adam, stepped
and projected on those epochs only) and ``unlearn`` after, with ``G`` taken from the live
model for the EMA copy.

    python docs/examples/timm_style_train.py --model test_resnet --epochs 16

Prints the STD accuracy of the live and EMA models, the prohibition table's summary and
the student's forget / retain accuracy, as one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json

import timm
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

import erm_surgery
from erm_surgery.data import load_mnist5k
from erm_surgery.training import is_erm_epoch
from erm_surgery.training.prohibition import prohibition_accuracy


@torch.no_grad()
def accuracy(model: torch.nn.Module, data, classes: list[int], keep: bool) -> float:
    """Test accuracy on the samples of ``classes`` (``keep=True``) or of the others."""
    x, y = data.tensors
    chosen = torch.isin(y, torch.tensor(classes)) == keep
    model.eval()
    pred = torch.cat([model(xb).argmax(1) for xb in x[chosen].split(500)])
    return float((pred == y[chosen]).float().mean())


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="test_resnet")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--forget", type=int, nargs="+", default=[3])
    parser.add_argument("--unlearn-epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    set_seed(args.seed)  # torch, numpy and random: timm's Mixup draws from numpy
    train_set, test_set = load_mnist5k()
    train_set.tensors = tuple(t[:args.n_train] for t in train_set.tensors)
    test_set.tensors = tuple(t[:args.n_test] for t in test_set.tensors)

    # --- the user's set-up, with the attached model in place of the plain one
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = erm_surgery.attach(timm.create_model(args.model, num_classes=10, in_chans=1))
    config = erm_surgery.ERMConfig()
    # timm's factories on the wrapped network; G keeps its own optimiser (ERM epochs only)
    optimizer = create_optimizer_v2(model.model, "sgd", lr=0.05, weight_decay=5e-4,
                                    momentum=0.9)
    g_optimizer = torch.optim.Adam([model.erm.G], lr=config.g_lr)
    scheduler, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=args.epochs,
                                       warmup_epochs=0)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    criterion = SoftTargetCrossEntropy()
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                                         drop_last=True)  # timm's Mixup needs even batches
    model, optimizer, g_optimizer, loader = accelerator.prepare(model, optimizer, g_optimizer,
                                                                loader)
    live = accelerator.unwrap_model(model)
    ema = ModelEmaV3(live, decay=0.998, use_warmup=True)  # warm-up needs update(step=)
    step = 0

    for epoch in range(args.epochs):
        erm_epoch = is_erm_epoch(epoch, config)
        model.train()
        for x, y in loader:
            x, y_soft = mixup(x, y)
            if erm_epoch:  # masked path: each image uses the mix of its classes' G rows
                loss = erm_surgery.erm_loss(model, x, y_soft, config, criterion=criterion)
            else:
                loss = criterion(model(x), y_soft)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if erm_epoch:
                g_optimizer.step()
                live.erm.project_(config.projection)
            g_optimizer.zero_grad(set_to_none=True)
            ema.update(live, step=step)
            step += 1
        scheduler.step(epoch + 1)

    # --- unlearning: the EMA copy's averaged G is positive almost everywhere, so it takes
    # the live model's G (docs/training.md, "EMA")
    ema_model = ema.module
    ema_model.erm.load_state_dict(live.erm.state_dict())
    table = prohibition_accuracy(live, test_set)
    extra = {} if args.unlearn_epochs is None else {"epochs": args.unlearn_epochs}
    student = erm_surgery.unlearn(ema_model, args.forget, train_set, show_progress=False,
                                  **extra)
    result = {
        "std_accuracy": table.std_accuracy,
        "ema_accuracy": accuracy(ema_model, test_set, [], keep=False),
        "prohibited": table.mean_prohibited,
        "permitted": table.mean_permitted,
        "student_forget": accuracy(student, test_set, args.forget, keep=True),
        "student_retain": accuracy(student, test_set, args.forget, keep=False),
        "ema_retain": accuracy(ema_model, test_set, args.forget, keep=False),
    }
    accelerator.print(json.dumps({k: round(v, 4) for k, v in result.items()}))
    return result


if __name__ == "__main__":
    main()
