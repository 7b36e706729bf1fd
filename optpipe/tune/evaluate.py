"""What `optpipe tune` scores candidates with: fidelity against PyTorch, or a classifier's accuracy on a file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from optpipe.data.calibration import jsonl_records
from optpipe.errors import EvalDataError, UnsupportedModelError
from optpipe.pipeline import ModelFiles
from optpipe.source import load_tokenizer, model_inputs, ModelSource

# The fidelity metric per task that `validate` computes, higher is better, 1.0 = identical to PyTorch.
FIDELITY_METRICS = ("mean_cosine", "top1_agreement", "next_token_agreement")
BATCH = 16
MAX_LENGTH = 128


@dataclass(frozen=True)
class Scorer:
    """score(files) -> higher-is-better number; baseline: the PyTorch model's score; loss is relative to it."""

    metric: str
    baseline: float
    score: Callable[[ModelFiles], float]
    describe: str

    def loss(self, value: float) -> float:
        """Relative loss as neural-compressor's tuning monitor counts it: (baseline - value) / baseline."""
        return (self.baseline - value) / self.baseline if self.baseline else 0.0


def fidelity_scorer(source: ModelSource, target: Any) -> Scorer:
    """1 - mean cosine (or 1 - top-1 agreement) against the PyTorch model on the validation texts."""
    from optpipe.validation.validate import validate

    def score(files: ModelFiles) -> float:
        metrics = validate(source, files, target).metrics
        for key in FIDELITY_METRICS:
            if key in metrics:
                return float(metrics[key])
        raise UnsupportedModelError(f"no fidelity metric for task {source.task!r} (metrics: {', '.join(metrics)})")

    return Scorer(fidelity_metric(source.task), 1.0, score,
                  f"1 - {fidelity_metric(source.task)} vs PyTorch on the validation texts")


def fidelity_metric(task: str) -> str:
    if task == "feature-extraction":
        return "mean_cosine"
    if task in ("text-classification", "token-classification"):
        return "top1_agreement"
    return "next_token_agreement"


def load_eval(path: str | Path, label2id: dict[str, int], num_labels: int) -> tuple[list[str], np.ndarray]:
    """Texts and label ids from a .jsonl file with `text` and `label` (an id or a label name)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise EvalDataError(f"eval file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalDataError(f"eval file {path} cannot be read as UTF-8 text: {exc}") from exc
    names = {k.lower(): v for k, v in label2id.items()}
    texts, labels = [], []
    for number, record in jsonl_records(path, lines, EvalDataError, "eval"):
        if not isinstance(record, dict) or "text" not in record or "label" not in record:
            raise EvalDataError(f"eval file {path}, line {number}: needs 'text' and 'label' fields")
        label = record["label"]
        if isinstance(label, str) and label.strip().isdigit():
            label = int(label)
        if isinstance(label, str):
            if label.lower() not in names:
                raise EvalDataError(f"eval file {path}, line {number}: unknown label {label!r} "
                                    f"(the model's labels: {', '.join(label2id)})")
            label = names[label.lower()]
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < num_labels:
            raise EvalDataError(f"eval file {path}, line {number}: label {record['label']!r} is not one of the "
                                f"model's {num_labels} labels")
        texts.append(str(record["text"]))
        labels.append(label)
    if not texts:
        raise EvalDataError(f"eval file {path} has no examples")
    return texts, np.array(labels)


def accuracy_scorer(source: ModelSource, eval_file: str | Path) -> Scorer:
    """A classifier's accuracy on labelled texts; the loss is the relative drop from the PyTorch model's."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if not Path(eval_file).expanduser().is_file():
        raise EvalDataError(f"eval file {eval_file} does not exist")
    if source.task != "text-classification":
        raise EvalDataError(f"--eval scores a text classifier; this model's task is {source.task!r} "
                            "(leave out --eval to tune on fidelity)")
    config = AutoConfig.from_pretrained(source.path)
    texts, labels = load_eval(eval_file, dict(config.label2id or {}), int(config.num_labels))
    tokenizer = load_tokenizer(source.path)
    encoded = [tokenizer(texts[i:i + BATCH], padding=True, truncation=True, max_length=MAX_LENGTH,
                         return_tensors="np") for i in range(0, len(texts), BATCH)]
    model = AutoModelForSequenceClassification.from_pretrained(source.path).eval()
    with torch.no_grad():
        reference = np.concatenate([model(**model_inputs(model, enc)).logits.numpy()
                                    for enc in encoded])
    baseline = float((reference.argmax(-1) == labels).mean())
    if baseline == 0.0:
        raise EvalDataError(f"the PyTorch model gets none of {eval_file} right: check the labels")

    def score(files: ModelFiles) -> float:
        from optpipe.session import create_session

        session = create_session(files.path / files.components[0], spinning="off")
        names = [i.name for i in session.get_inputs()]
        logits = []
        for enc in encoded:
            feed = {n: enc[n].astype(np.int64) if n in enc else np.zeros_like(enc["input_ids"], dtype=np.int64)
                    for n in names}
            logits.append(session.run(None, feed)[0])
        return float((np.concatenate(logits).argmax(-1) == labels).mean())

    return Scorer("accuracy", baseline, score,
                  f"relative accuracy drop on {len(texts)} labelled texts ({Path(eval_file).name}; "
                  f"PyTorch accuracy {baseline:.4f})")
