"""The judge: a small CNN trained on the real built-in images to read their attributes.

It predicts shape, colour, size and position with one head each. Evaluation uses it to score
prompt adherence of generated images without any downloaded weights; its own accuracy on the real
validation images (held-out combinations included) is reported next to the adherence numbers, so
a reader knows how far to trust it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from diffusion.artifacts import JUDGE_INFO, JUDGE_WEIGHTS
from diffusion.data.captions import ATTRIBUTES
from diffusion.config import JudgeConfig
from diffusion.errors import MissingInputError
from diffusion.data.text import pick_device


class JudgeNet(nn.Module):
    def __init__(self, vocab: dict[str, list[str]], width: int = 32):
        super().__init__()
        w = width

        def block(c_in, c_out):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                                 nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())

        self.features = nn.Sequential(block(3, w), nn.MaxPool2d(2), block(w, 2 * w), nn.MaxPool2d(2),
                                      block(2 * w, 4 * w))
        # position and size need to know *where*: keep a coarse spatial map, not just a global pool
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.heads = nn.ModuleDict({a: nn.Linear(4 * w * 4, len(v)) for a, v in vocab.items()})

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The features every head reads (B, 16 * width): what FD-judge compares."""
        return self.pool(self.features(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.embed(x)
        return {a: head(h) for a, head in self.heads.items()}


def to_input(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def labels_from_metas(metas: list[dict], vocab: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """Class indices per attribute; -1 where a prompt does not name the attribute (``""``)."""
    return {a: np.array([vocab[a].index(m[a]) if m[a] else -1 for m in metas], dtype=np.int64) for a in vocab}


def train_judge(cfg: JudgeConfig, images: np.ndarray, labels: dict[str, np.ndarray],
                vocab: dict[str, list[str]], progress: bool = True) -> JudgeNet:
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = JudgeNet(vocab, cfg.width).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    x_all = to_input(images)
    y_all = {a: torch.from_numpy(v) for a, v in labels.items()}
    model.train()
    bar = tqdm(range(cfg.steps), desc="judge", unit="step", disable=not progress, mininterval=2.0)
    for _ in bar:
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=gen)
        x = light_noise(x_all[idx], gen)
        out = model(x.to(device))
        loss = sum(F.cross_entropy(out[a], y_all[a][idx].to(device)) for a in vocab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()



def light_noise(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light noise on a training batch, so generated images (never pixel-perfect) are read like
    real ones (the judge's and the retrieval evaluator's training)."""
    return x + 0.04 * torch.randn(x.shape, generator=gen) * torch.rand(x.shape[0], 1, 1, 1, generator=gen)


@torch.no_grad()
def predict(model: JudgeNet, images: np.ndarray, batch_size: int = 1024) -> dict[str, np.ndarray]:
    device = next(model.parameters()).device
    preds: dict[str, list[np.ndarray]] = {a: [] for a in model.heads}
    for i in range(0, len(images), batch_size):
        out = model(to_input(images[i:i + batch_size]).to(device))
        for a, logits in out.items():
            preds[a].append(logits.argmax(-1).cpu().numpy())
    return {a: np.concatenate(v) if v else np.zeros(0, int) for a, v in preds.items()}


@torch.no_grad()
def embed(model: JudgeNet, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 16 * width) float64 judge features."""
    device = next(model.parameters()).device
    parts = [model.embed(to_input(images[i:i + batch_size]).to(device)).double().cpu().numpy()
             for i in range(0, len(images), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, model.heads[next(iter(model.heads))].in_features))


GROUPS = {
    "overall": "training wording, every combination",
    "seen": "training wording, combinations trained on",
    "held_out": "training wording, combinations never trained on",
    "new_wording": "held-out wording (frames and phrasings no training caption uses), combinations trained on",
    "new_wording_held_out": "held-out wording on combinations never trained on",
    "partial": "prompts naming only some attributes, scored on those",
}


def groups_of(rows: list[dict]) -> dict[str, np.ndarray]:
    """Evaluation groups of prompt rows (``GROUPS``): a prompt that leaves an attribute out
    (``""``) is ``partial``; the others split by wording (``train`` or ``new``, the held-out
    lexicon) and by whether the combination was held out. Groups without rows are left out,
    except the three of the training wording."""
    held = np.array([bool(r.get("held_out", False)) for r in rows], bool)
    new = np.array([r.get("wording", "train") == "new" for r in rows], bool)
    partial = np.array([any(r.get(a) == "" for a in ATTRIBUTES) for r in rows], bool)
    full = ~partial
    groups = {"overall": full & ~new, "seen": full & ~new & ~held, "held_out": full & ~new & held,
              "new_wording": full & new & ~held, "new_wording_held_out": full & new & held, "partial": partial}
    return {k: v for k, v in groups.items() if k in ("overall", "seen", "held_out") or v.any()}


def score(pred: dict[str, np.ndarray], truth: dict[str, np.ndarray], groups: dict[str, np.ndarray]) -> dict:
    """Per-attribute and all-correct accuracy for each group (a boolean mask over the rows). A
    truth of -1 (the prompt does not name the attribute) is not scored: the attribute's accuracy
    counts only rows that name it, and "all" means every *named* attribute is right."""
    named = {a: truth[a] >= 0 for a in truth}
    correct = {a: pred[a] == truth[a] for a in truth}
    every = np.logical_and.reduce([correct[a] | ~named[a] for a in truth])

    def acc(mask: np.ndarray) -> dict:
        n = int(mask.sum())
        res = {a: float(c[mask & named[a]].mean()) if (mask & named[a]).any() else float("nan")
               for a, c in correct.items()}
        res["all"] = float(every[mask].mean()) if n else float("nan")
        res["n"] = n
        return res

    return {name: acc(mask) for name, mask in groups.items()}


def vocab_of(dataset_cfg) -> dict[str, list[str]]:
    return {"shape": list(dataset_cfg.shapes), "color": list(dataset_cfg.colors),
            "size": list(dataset_cfg.sizes), "position": list(dataset_cfg.positions)}


def save_judge(model: JudgeNet, vocab: dict, width: int, image_size: int, metrics: dict, out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / JUDGE_WEIGHTS))
    (out / JUDGE_INFO).write_text(json.dumps({"vocab": vocab, "width": width, "image_size": image_size,
                                                "val": metrics}, indent=2) + "\n")


def save_not_applicable(out_dir: str | Path, reason: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / JUDGE_INFO).write_text(json.dumps({"applicable": False, "reason": reason}, indent=2) + "\n")


def load_judge(directory: str | Path, device: str = "cpu") -> tuple[JudgeNet | None, dict]:
    """(model, info); model is None where the judge does not apply (info["reason"] says why)."""
    d = Path(directory)
    if not (d / JUDGE_INFO).is_file():
        raise MissingInputError(f"judge not found at {d} (run the judge stage first)")
    info = json.loads((d / JUDGE_INFO).read_text())
    if info.get("applicable") is False:
        return None, info
    model = JudgeNet(info["vocab"], info["width"])
    model.load_state_dict(load_file(str(d / JUDGE_WEIGHTS)))
    return model.to(device).eval(), info



def build_judge(dataset_cfg, cfg: JudgeConfig, val_shards: list[str], out_dir: str | Path,
                progress: bool = True) -> dict:
    """Render the judge's training images (every combination), train it, score it on the real
    validation shards (seen and held-out combinations), save it. Returns the validation scores."""
    from diffusion.data.shapes import make_sample
    from diffusion.data.shards import iter_samples

    if not val_shards:
        raise MissingInputError("no validation shards to score the judge on (run the ingest stage first)")
    vocab = vocab_of(dataset_cfg)
    samples = [make_sample(dataset_cfg, "judge", i) for i in tqdm(range(cfg.n_images), desc="render judge set",
                                                                  disable=not progress, mininterval=2.0)]
    images = np.stack([np.asarray(s.image) for s in samples])
    model = train_judge(cfg, images, labels_from_metas([s.meta for s in samples], vocab), vocab, progress)
    val = list(iter_samples(val_shards))
    metas = [s["meta"] for s in val]
    metrics = score(predict(model, np.stack([s["image"] for s in val])), labels_from_metas(metas, vocab),
                    groups_of(metas))
    save_judge(model, vocab, cfg.width, dataset_cfg.image_size, metrics, out_dir)
    return metrics
