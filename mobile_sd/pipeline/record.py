"""Record the fp32 reference pipeline: the one implementation used by ``export`` (reference
I/O, int8 calibration data) and ``parity`` (real inputs, end-to-end reference images).

Each prompt runs with its own seed (``seed + i``) and the recorder's context carries the prompt
index and the guidance scale, which folded-CFG components read to build their inputs.

Example (not run by the tests: it needs real artifacts)::

    recorder, images = record_runs(model, ["a cat"], steps=1, guidance=4.5)
    [c.component for c in recorder.calls()][:2]
    # -> ['text_encoder', 'text_encoder']
"""
from __future__ import annotations

from typing import Sequence

from mobile_sd.pipeline.recorder import Recorder


def record_runs(model, prompts: Sequence[str], steps: int | None, guidance: float,
                seed: int = 0, progress: bool = False) -> tuple[Recorder, list]:
    """Run ``generate`` for every prompt, recording every component call.

    Returns ``(recorder, images)``: one uint8 image per prompt. ``steps=None`` uses the
    model's default step count.
    """
    from mobile_sd.pipeline.reference import generate

    recorder, images = Recorder(), []
    for i, prompt in enumerate(prompts):
        recorder.context = {"prompt": i, "guidance": guidance}
        result = generate(model, prompt, steps=steps, guidance=guidance, seed=seed + i,
                          recorder=recorder, progress=progress)
        images.append(result.image)
    return recorder, images
