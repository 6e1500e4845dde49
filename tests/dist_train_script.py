"""Run by test_training.py under `torchrun --nproc_per_node 2` (CPU, gloo).

Each rank writes what it saw to rank{R}.json in the folder given on the command line.
"""

import json
import sys
from pathlib import Path

import timm
import torch
from helpers import separated
from torch.utils.data import DataLoader, TensorDataset

import erm_surgery as E
from erm_surgery.methods.ktp import KTPConfig, ktp
from erm_surgery.training import ERMConfig, ERMTrainer, make_accelerator, std_accuracy


def main(out: Path) -> None:
    acc = make_accelerator()
    assert acc.num_processes == 2, f"expected 2 connected processes, got {acc.num_processes}"
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 1, 16, 16, generator=g)
    y = torch.randint(0, 4, (400,), generator=g)
    x += y.view(-1, 1, 1, 1) * 0.5  # learnable signal
    train_set = TensorDataset(x[:300], y[:300])
    # 101 samples: uneven over 2 ranks, so duplicates or drops would show
    val_set = TensorDataset(torch.cat([x[300:], x[:1]]), torch.cat([y[300:], y[:1]]))
    model = E.attach(timm.create_model("test_resnet", num_classes=4, in_chans=1))
    trainer = ERMTrainer(model, train_set, epochs=3, val_data=val_set, batch_size=32,
                         accelerator=acc, config=ERMConfig(warmup_epochs=0),
                         output_dir=out / "out", checkpoint_every=2, show_progress=False)
    result = trainer.fit()
    G = result.model.erm.G.detach()
    flat = torch.cat([p.detach().flatten() for p in result.model.model.parameters()])
    gathered_g = acc.gather(G.unsqueeze(0))
    gathered_w = acc.gather(flat.unsqueeze(0))
    seen = 0
    for _, yb in trainer.val_loader:
        seen += acc.gather_for_metrics(yb).numel()
    reference = std_accuracy(result.model, DataLoader(val_set, batch_size=50))
    record = {
        "rank": acc.process_index,
        "world_size": acc.num_processes,
        "g_sum": float(G.double().sum()),
        "w_sum": float(flat.double().sum()),
        "g_equal_across_ranks": bool(torch.equal(gathered_g[0], gathered_g[1])),
        "w_equal_across_ranks": bool(torch.equal(gathered_w[0], gathered_w[1])),
        "val_seen": seen,
        "val_accuracy": result.history[-1].val_accuracy,
        "reference_val_accuracy": reference,
    }
    # KTP on the same two processes: one distillation epoch, student synchronised (on a
    # hand-separated G: 3 epochs do not separate the classes and KTP would refuse)
    separated(result.model)
    student, info = ktp(result.model, [1], train_set, accelerator=acc,
                        config=KTPConfig(epochs=1, batch_size=16, show_progress=False))
    s_flat = torch.cat([p.detach().flatten() for p in student.model.parameters()])
    gathered_s = acc.gather(s_flat.unsqueeze(0))
    record["ktp_equal_across_ranks"] = bool(torch.equal(gathered_s[0], gathered_s[1]))
    record["ktp_forgotten"] = student.erm.forgotten_classes
    record["ktp_samples"] = info.samples
    record["retain_count"] = int((train_set.tensors[1] != 1).sum())
    with torch.no_grad():
        record["ktp_predicts_forgotten"] = bool((student(x).argmax(1) == 1).any())
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(record))
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
