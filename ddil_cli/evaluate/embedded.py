"""`embedded:digits`: the embedded image lab's digits classifier as a feature space.

Its penultimate features serve FD and PR/DC; its agreement with the digit each prompt names is
the lab's prompt alignment (the CLIP-score analogue). The classifier and its helpers live in the
models layer (`ddil_cli.models.digits`); this file only adapts them to the extractor interface and
registers the space. When its classifier file is missing, building the
extractor raises WeightsUnavailable and the metrics are reported unavailable.
"""

from __future__ import annotations

import numpy as np
import torch

from ddil_cli.errors import UserError
from ddil_cli.models import digits
from ddil_cli.evaluate.features import (ExtractorOptions, FeatureExtractor, WeightsUnavailable,
                                        feature_space_names, register_feature_space)

NAME = "embedded:digits"


class DigitsExtractor(FeatureExtractor):
    name = NAME
    description = "embedded digits classifier, penultimate features"

    def __init__(self, options: ExtractorOptions):
        path = getattr(options, "digits_classifier", None) or digits.CLASSIFIER_PATH
        try:
            self.model = digits.load_digits_classifier(path, device=options.device)
        except UserError as exc:
            raise WeightsUnavailable(str(exc)) from None
        super().__init__(path, options)
        self._digits = digits
        # the classifier reads the teacher's own pixels: prepare images at its resolution
        self.eval_res = int(self.model.config.resolution)

    def _tensor(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return x.to(self.options.device)

    @torch.no_grad()
    def features(self, batch: np.ndarray) -> np.ndarray:
        return self.model.features(self._tensor(batch)).float().cpu().numpy()

    def prompt_alignment(self, batch: np.ndarray, prompts: list[str]) -> np.ndarray:
        """1 where the classifier reads the digit the prompt names, else 0 (per sample)."""
        targets = [self._digits.digit_from_prompt(p) for p in prompts]
        if any(t is None for t in targets):
            bad = next(p for p, t in zip(prompts, targets) if t is None)
            raise UserError(f"prompt {bad!r} names no single digit; {NAME} prompt alignment needs prompts "
                            f"such as {self._digits.digit_prompt(3)!r}")
        predicted = self._digits.classify(self._tensor(batch), self.model)
        return (predicted.numpy() == np.array(targets)).astype(np.float64)


if NAME not in feature_space_names():
    register_feature_space(NAME, DigitsExtractor)
