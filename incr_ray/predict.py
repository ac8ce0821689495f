"""Classify texts with a finished model folder (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

from .modeling import ModelError, check_classifier, classifier_logits, load_classifier, load_tokenizer
from .method.targets import softmax


def predict_texts(model_dir: str, texts: list[str], max_length: int = 256) -> list[list[tuple[str, float]]]:
    """Per text, (label name, probability) pairs from most to least likely."""
    if not (Path(model_dir) / "config.json").is_file():
        raise ModelError(f"--model {model_dir!r} is not a model folder (no config.json); pass a gen_*/model folder")
    check_classifier(model_dir)
    tok = load_tokenizer(model_dir)
    model = load_classifier(model_dir, tokenizer=tok).eval()
    probs = softmax(classifier_logits(model, tok, texts, max_length))
    names = [model.config.id2label[i] for i in range(probs.shape[1])]
    return [sorted(zip(names, map(float, row)), key=lambda x: -x[1]) for row in probs]
