"""Apple's StableDiffusion Swift app, emulated in Python from its contract.

A re-implementation of the *logic* of ``StableDiffusionPipeline.generateImages`` in
apple/ml-stable-diffusion (``swift/StableDiffusion/``), written from the contract in
``docs/swift_contract.md`` (read that for the file and function each behaviour comes from):

* tokenizer: :class:`SwiftBPETokenizer` (trim, lowercase, split on spaces only, character-level
  BPE with CLIP's merges; no text cleaning, no byte-level mapping, no punctuation split; pads
  with ``<|endoftext|>``; truncates by dropping the tail, so a long prompt loses its eos);
* text encoder called with token ids as **float32** ``[1, 77]``, once for the prompt and (if
  guidance >= 1) once for the negative prompt; embeddings stacked ``[negative, prompt]`` and
  transposed to ``[2, D, 1, 77]``;
* one batch-2 UNet call per step (``sample`` = ``[x, x]``, ``timestep`` float32 ``[2]``), or
  two batch-1 calls (uncond first) for a batch-1 UNet; guidance
  ``uncond + g * (cond - uncond)`` in float32 on the outputs, which it treats as **epsilon**;
* schedulers: :class:`SwiftDPMSolverMultistepScheduler` ("dpmpp") and
  :class:`SwiftPNDMScheduler` ("pndm", the app's default), float32 tables as in Swift;
* latents: ``initNoiseSigma`` (1) x NumPy's legacy normal draws from the seed (the Swift
  package's ``NumPyRandomSource`` is NumPy's ``RandomState`` Mersenne Twister + polar
  Box-Muller), or given;
* the image decoded is the scheduler's **last x0 prediction** (``modelOutputs.last``), divided
  by 0.18215; image = clip((x + 1) / 2) -> uint8.

Components are plain callables on numpy float32 arrays (what Core ML's ``MLMultiArray`` holds),
so that Core ML packages run by a MIL interpreter or eager modules can be plugged in:
``text_encoder(ids[1,77] f32) -> [1,77,D]``, ``unet(sample, timestep[B], ehs[B,D,1,77]) ->
noise_pred``, ``decoder(z[1,4,S,S]) -> image[1,3,8S,8S]``. Builders live above this layer:
:func:`mobile_sd.parity.swift_app.eager_swift_components` (eager modules, optionally with the
``v_to_epsilon`` surgery) and :func:`mobile_sd.parity.swift_app.bundle_components` (a Core ML
bundle's own files through the MIL runtime).

:func:`reference_dpmpp` is the fp32 PyTorch pipeline on the eager (v-prediction) model with
diffusers' ``DPMSolverMultistepScheduler`` set up as the Swift app sets up its own
(:func:`diffusers_dpmpp_like_swift`), the yardstick for the app's image.

>>> comps = eager_swift_components(build_model("snapfusion-tiny"))            # doctest: +SKIP
>>> cfg = SwiftConfiguration("a photo of a cat", step_count=8, guidance_scale=4.5,
...                          scheduler="dpmpp", seed=0)                       # doctest: +SKIP
>>> run_swift_app(comps, cfg).image.shape                                     # doctest: +SKIP
(128, 128, 3)
"""
from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np

from mobile_sd.errors import InvalidArgumentError

F32 = np.float32
Array = np.ndarray
SchedulerName = Literal["pndm", "dpmpp"]
TimestepSpacing = Literal["linspace", "leading", "karras"]


# ============================================================================= configuration

@dataclass
class SwiftConfiguration:
    """``PipelineConfiguration`` (StableDiffusionPipeline.Configuration.swift), text-to-image
    fields, with the package's defaults: 50 steps, guidance 7.5, seed 0, PNDM, linspace,
    NumPy RNG, decoder scale 0.18215. SnapFusion needs ``scheduler="dpmpp"``, 8 steps, 4.5."""
    prompt: str
    negative_prompt: str = ""
    step_count: int = 50
    seed: int = 0
    guidance_scale: float = 7.5
    scheduler: SchedulerName = "pndm"
    timestep_spacing: TimestepSpacing = "linspace"  # only read by "dpmpp"
    decoder_scale_factor: float = 0.18215
    decoder_shift_factor: float = 0.0  # in the configuration, but generateImages never passes it

    def validate(self) -> None:
        if self.scheduler not in ("pndm", "dpmpp"):
            raise InvalidArgumentError(f"scheduler must be 'pndm' or 'dpmpp' (the Swift app's "
                                       f"epsilon schedulers), got {self.scheduler!r}")
        if self.timestep_spacing not in ("linspace", "leading", "karras"):
            raise InvalidArgumentError(f"timestep_spacing must be linspace, leading or karras, "
                                       f"got {self.timestep_spacing!r}")
        if isinstance(self.step_count, bool) or not isinstance(self.step_count, int) \
                or not 1 <= self.step_count <= 1000:
            raise InvalidArgumentError(f"step_count must be an int in 1..1000, "
                                       f"got {self.step_count!r}")
        if not 0 <= int(self.seed) <= 0xFFFFFFFF:
            raise InvalidArgumentError(f"seed is a UInt32 in the app, got {self.seed!r}")


# ============================================================================= tokenizer

class SwiftBPETokenizer:
    """The Swift package's ``BPETokenizer`` behaviour on ``vocab.json`` + ``merges.txt``.

    Differences from CLIP's / HF's tokenizer (all from BPETokenizer.swift): no ftfy / HTML
    cleaning, no whitespace collapsing beyond splitting on ``" "`` (tabs/newlines inside stay
    in words), no regex pre-split (punctuation and digits stay glued to words), BPE runs on
    characters (no byte-to-unicode map: non-Latin-1 characters become unknown =
    ``<|endoftext|>``), truncation keeps the first 77 tokens (no eos at the end).
    For lowercase ASCII words separated by single spaces, ids equal CLIP's.
    """

    start_token = "<|startoftext|>"
    end_token = "<|endoftext|>"

    def __init__(self, vocabulary: dict[str, int], merges: dict[tuple[str, str], int],
                 pad_token: str = "<|endoftext|>"):
        self.vocabulary = vocabulary
        self.merges = merges
        self.pad_token = pad_token
        self.unknown_id = vocabulary.get(self.end_token, 0)

    @classmethod
    def from_files(cls, vocab_json: str | Path, merges_txt: str | Path) -> "SwiftBPETokenizer":
        vocabulary = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        merges: dict[tuple[str, str], int] = {}
        # Rank = line index in the file (header included), as readMerges counts lines.
        for index, line in enumerate(Path(merges_txt).read_bytes().split(b"\n")):
            if not line or line.startswith(b"#"):
                continue
            pair = line.split(b" ")
            if len(pair) != 2:
                raise InvalidArgumentError(f"{merges_txt}: line {index + 1} is not a merge pair")
            merges[(pair[0].decode("utf-8"), pair[1].decode("utf-8"))] = index
        return cls(vocabulary, merges)

    @classmethod
    def default(cls) -> "SwiftBPETokenizer":
        """On the ``vocab.json`` / ``merges.txt`` our Core ML bundles ship."""
        from mobile_sd.models.tokenizer import write_vocab_files

        with tempfile.TemporaryDirectory(prefix="mobile-sd-swift-bpe-") as tmp:
            vocab, merges = write_vocab_files(tmp)
            return cls.from_files(vocab, merges)

    def _encode_word(self, word: str) -> list[str]:
        tokens = list(word)
        if tokens:
            tokens[-1] += "</w>"
        while len(tokens) > 1:
            pairs = {(a, b) for a, b in zip(tokens, tokens[1:])}
            ranked = [(self.merges[p], p) for p in pairs if p in self.merges]
            if not ranked:
                break
            first, second = min(ranked)[1]
            merged, i = [], 0
            while i < len(tokens):  # greedy, left to right, every occurrence
                if i < len(tokens) - 1 and tokens[i] == first and tokens[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(tokens[i])
                    i += 1
            tokens = merged
        return tokens

    def encode(self, text: str) -> list[str]:
        # Swift: trimmingCharacters(in: .whitespacesAndNewlines).lowercased().split(separator: " ")
        words = [w for w in text.strip().lower().split(" ") if w]
        return [t for w in words for t in self._encode_word(w)]

    def tokenize(self, text: str, min_count: int | None = None) -> tuple[list[str], list[int]]:
        tokens = [self.start_token, *self.encode(text), self.end_token]
        if min_count is not None and min_count > len(tokens):
            tokens += [self.pad_token] * (min_count - len(tokens))
        return tokens, [self.vocabulary.get(t, self.unknown_id) for t in tokens]

    def input_ids(self, text: str, length: int = 77) -> Array:
        """What ``TextEncoder.encode`` feeds the model: float32 ``[1, length]``."""
        _, ids = self.tokenize(text, min_count=length)
        return np.asarray(ids[:length], dtype=F32).reshape(1, length)


# ============================================================================= schedulers

def _linspace_f32(start: float, end: float, count: int) -> Array:
    """Scheduler.swift ``linspace``: ``Float(i) * scale + start`` in Float."""
    start, end = F32(start), F32(end)
    scale = F32(end - start) / F32(count - 1)
    return np.arange(count, dtype=F32) * scale + start


def _round_away(x) -> Array:
    """Swift's ``round`` / ``rounded()``: half away from zero (NumPy's round is half-even)."""
    x = np.asarray(x, dtype=np.float64)
    return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)


def _alphas_cumprod_f32(train_steps: int, beta_schedule: str, beta_start: float,
                        beta_end: float) -> Array:
    if beta_schedule == "scaled_linear":
        betas = _linspace_f32(math.sqrt(F32(beta_start)), math.sqrt(F32(beta_end)), train_steps)
        betas = betas * betas
    elif beta_schedule == "linear":
        betas = _linspace_f32(beta_start, beta_end, train_steps)
    else:
        raise InvalidArgumentError(f"beta_schedule must be scaled_linear or linear, "
                                   f"got {beta_schedule!r}")
    return np.cumprod(F32(1) - betas, dtype=F32)


def _weighted_sum(weights: Sequence[float], values: Sequence[Array]) -> Array:
    """Scheduler.swift ``weightedSum``: Double weights cast to Float, saxpy in order."""
    out = np.zeros_like(values[0], dtype=F32)
    for w, v in zip(weights, values):
        out = out + F32(w) * v.astype(F32)
    return out


class SwiftDPMSolverMultistepScheduler:
    """DPMSolverMultistepScheduler.swift: DPM-Solver++ (2M, midpoint), epsilon only.

    Settings fixed in Swift: solverOrder 2, useLowerOrderFinal true; trainStepCount 1000,
    scaledLinear 0.00085..0.012; timeStepSpacing from the configuration (default linspace).
    Below 15 steps, the last **two** steps are first order (diffusers: only the last);
    the final step goes to timestep 0 (not sigma 0), but the app decodes ``model_outputs[-1]``.
    """

    solver_order = 2
    use_lower_order_final = True
    init_noise_sigma = 1.0

    def __init__(self, step_count: int = 50, train_step_count: int = 1000,
                 beta_schedule: str = "scaled_linear", beta_start: float = 0.00085,
                 beta_end: float = 0.012, timestep_spacing: TimestepSpacing = "linspace"):
        self.train_step_count, self.inference_step_count = train_step_count, step_count
        self.alphas_cumprod = _alphas_cumprod_f32(train_step_count, beta_schedule, beta_start,
                                                  beta_end)
        ac = self.alphas_cumprod
        self.using_karras = timestep_spacing == "karras"
        if timestep_spacing == "linspace":
            grid = _linspace_f32(0, train_step_count - 1, step_count + 1)[1:][::-1]
            self.time_steps = [int(t) for t in _round_away(grid)]
        elif timestep_spacing == "leading":
            ratio = (train_step_count - 1) // (step_count + 1)
            self.time_steps = [1 + i * ratio for i in range(step_count + 1)][1:][::-1]
        elif timestep_spacing == "karras":
            sigmas = np.sqrt((F32(1) - ac) * (F32(1) / ac)).astype(F32)
            log_sigmas = np.log(sigmas)
            sigma_min, sigma_max, rho = sigmas[0], sigmas[-1], F32(7)
            ramp = _linspace_f32(0, 1, step_count)
            min_inv, max_inv = sigma_min ** (F32(1) / rho), sigma_max ** (F32(1) / rho)
            karras = ((max_inv + ramp * (min_inv - max_inv)) ** rho).astype(F32)
            self.time_steps = [_sigma_to_timestep(s, log_sigmas) for s in karras]
            karras = np.append(karras, karras[-1])
            self.alpha_t = (F32(1) / np.sqrt(F32(1) + karras * karras)).astype(F32)
            self.sigma_t = (karras * self.alpha_t).astype(F32)
        else:
            raise InvalidArgumentError(f"timestep_spacing must be linspace, leading or karras, "
                                       f"got {timestep_spacing!r}")
        if not self.using_karras:
            self.alpha_t = np.sqrt(ac).astype(F32)
            self.sigma_t = np.sqrt(F32(1) - ac).astype(F32)
        self.lambda_t = (np.log(self.alpha_t) - np.log(self.sigma_t)).astype(F32)
        self.model_outputs: list[Array] = []
        self.lower_order_stepped = 0

    def _index(self, timestep: int) -> int:
        if not self.using_karras:
            return timestep
        return self.time_steps.index(timestep) if timestep in self.time_steps else 0

    def convert_model_output(self, output: Array, timestep: int, sample: Array) -> Array:
        i = self._index(timestep)
        return ((sample - output * self.sigma_t[i]) / self.alpha_t[i]).astype(F32)

    def _first_order(self, m0: Array, t: int, prev_t: int, sample: Array) -> Array:
        p, c = self._index(prev_t), self._index(t)
        h = float(self.lambda_t[p]) - float(self.lambda_t[c])
        return _weighted_sum([float(self.sigma_t[p]) / float(self.sigma_t[c]),
                              -float(self.alpha_t[p]) * (math.exp(-h) - 1)], [sample, m0])

    def _second_order(self, outputs: list[Array], steps: list[int], prev_t: int,
                      sample: Array) -> Array:
        s0, s1 = steps[-1], steps[-2]
        m0, m1 = outputs[-1], outputs[-2]
        lt, l0, l1 = (float(self.lambda_t[self._index(x)]) for x in (prev_t, s0, s1))
        alpha, sigma, sigma_s0 = (float(self.alpha_t[self._index(prev_t)]),
                                  float(self.sigma_t[self._index(prev_t)]),
                                  float(self.sigma_t[self._index(s0)]))
        h, h0 = lt - l0, l0 - l1
        r0 = h0 / h
        d1 = _weighted_sum([1 / r0, -1 / r0], [m0, m1])
        return _weighted_sum([sigma / sigma_s0, -alpha * (math.exp(-h) - 1),
                              -0.5 * alpha * (math.exp(-h) - 1)], [sample, m0, d1])

    def step(self, output: Array, timestep: int, sample: Array) -> Array:
        n = len(self.time_steps)
        index = self.time_steps.index(timestep) if timestep in self.time_steps else n - 1
        prev_t = 0 if index == n - 1 else self.time_steps[index + 1]
        final = self.use_lower_order_final and index == n - 1 and n < 15
        second_last = self.use_lower_order_final and index == n - 2 and n < 15
        lower = self.lower_order_stepped < 1 or final or second_last
        m0 = self.convert_model_output(output, timestep, sample)
        if len(self.model_outputs) == self.solver_order:
            self.model_outputs.pop(0)
        self.model_outputs.append(m0)
        if lower:
            prev = self._first_order(m0, timestep, prev_t, sample)
        else:
            prev = self._second_order(self.model_outputs, [self.time_steps[index - 1], timestep],
                                      prev_t, sample)
        if self.lower_order_stepped < self.solver_order:
            self.lower_order_stepped += 1
        return prev


def _sigma_to_timestep(sigma, log_sigmas: Array) -> int:
    """DPMSolverMultistepScheduler.swift ``sigmaToTimestep`` (karras spacing)."""
    log_sigma = np.log(F32(sigma))
    dists = log_sigma - log_sigmas
    low = -1
    for d in dists:  # last non-negative distance, clipped to len - 2
        if d >= 0 and low < len(dists) - 2:
            low += 1
    low = max(low, 0)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = float(np.clip((lo - log_sigma) / (lo - hi), 0, 1))
    return int(_round_away((1 - w) * low + w * (low + 1)))


class SwiftPNDMScheduler:
    """Scheduler.swift ``PNDMScheduler``: PLMS only (no PRK), steps_offset 1, epsilon only.
    ``step_count`` steps make ``step_count + 1`` UNet calls (the first timestep twice)."""

    init_noise_sigma = 1.0

    def __init__(self, step_count: int = 50, train_step_count: int = 1000,
                 beta_schedule: str = "scaled_linear", beta_start: float = 0.00085,
                 beta_end: float = 0.012):
        self.train_step_count, self.inference_step_count = train_step_count, step_count
        self.alphas_cumprod = ac = _alphas_cumprod_f32(train_step_count, beta_schedule,
                                                       beta_start, beta_end)
        if step_count < 2:
            raise InvalidArgumentError("the Swift PNDMScheduler needs step_count >= 2 (with 1 "
                                       "step its init unwraps the last of an empty list)")
        ratio = F32(train_step_count // step_count)
        forward = [int(_round_away(F32(i) * ratio)) + 1 for i in range(step_count)]
        self.time_steps = (forward[:-1] + [forward[-2], forward[-1]])[::-1]
        self.alpha_t = np.sqrt(ac).astype(F32)
        self.sigma_t = np.sqrt(F32(1) - ac).astype(F32)
        self.model_outputs: list[Array] = []
        self.counter, self.ets, self.current_sample = 0, [], None

    def step(self, output: Array, timestep: int, sample: Array) -> Array:
        t = timestep
        inc = self.train_step_count // self.inference_step_count
        prev = t - inc
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(output)
        else:
            prev, t = t, t + inc
        e = self.ets
        if len(e) == 1 and self.counter == 0:
            model_output, self.current_sample = output, sample
        elif len(e) == 1 and self.counter == 1:
            model_output = _weighted_sum([0.5, 0.5], [output, e[-1]])
            sample, self.current_sample = self.current_sample, None
        elif len(e) == 2:
            model_output = _weighted_sum([1.5, -0.5], [e[-1], e[-2]])
        elif len(e) == 3:
            model_output = _weighted_sum([23 / 12, -16 / 12, 5 / 12], [e[-1], e[-2], e[-3]])
        else:
            model_output = _weighted_sum([55 / 24, -59 / 24, 37 / 24, -9 / 24],
                                         [e[-1], e[-2], e[-3], e[-4]])
        self.model_outputs.append(
            ((sample - model_output * self.sigma_t[t]) / self.alpha_t[t]).astype(F32))
        a_t = self.alphas_cumprod[t]  # Float arithmetic, as in previousSample
        a_prev = self.alphas_cumprod[max(0, prev)]
        b_t, b_prev = F32(1) - a_t, F32(1) - a_prev
        sample_coeff = np.sqrt(a_prev / a_t)
        denom = a_t * np.sqrt(b_prev) + np.sqrt(a_t * b_t * a_prev)
        model_coeff = -(a_prev - a_t) / denom
        self.counter += 1
        return _weighted_sum([float(sample_coeff), float(model_coeff)], [sample, model_output])


def make_swift_scheduler(config: SwiftConfiguration):
    """What ``generateImages`` builds for ``config.schedulerType`` (defaults for the rest)."""
    config.validate()
    if config.scheduler == "pndm":
        return SwiftPNDMScheduler(config.step_count)
    return SwiftDPMSolverMultistepScheduler(config.step_count,
                                            timestep_spacing=config.timestep_spacing)


# ============================================================================= latents, image

def numpy_rng_latents(seed: int, shape: Sequence[int], stdev: float = 1.0) -> Array:
    """``NumPyRandomSource(seed).normalShapedArray(shape, 0, stdev)`` as Float32: NumPy's
    legacy ``RandomState(seed)`` normals (MT19937 seeded by ``init_genrand``, polar
    Box-Muller), which the Swift source states it matches."""
    draws = np.random.RandomState(int(seed)).standard_normal(int(np.prod(shape)))
    return (draws * stdev).astype(F32).reshape(tuple(shape))


def image_to_uint8(image: Array) -> Array:
    """CGImage+vImage.swift ``fromShapedArray``: first batch item, ``(x + 1) * 0.5``, then
    vImage float -> 8-bit (x255, clipped; rounded to nearest here), HxWx3."""
    x = np.asarray(image, dtype=F32)[0]
    x = (x + F32(1.0)) * F32(0.5)
    return np.clip(np.floor(x * F32(255.0) + F32(0.5)), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def to_hidden_states(embedding: Array) -> Array:
    """``toHiddenStates``: ``[B, 77, D]`` -> ``[B, D, 1, 77]``."""
    return np.ascontiguousarray(np.asarray(embedding, F32).transpose(0, 2, 1)[:, :, None, :])


# ============================================================================= the app

@dataclass
class SwiftComponents:
    """The three models as the app sees them (numpy float32 in and out).

    ``latent_sample_shape`` is the UNet's ``sample`` input shape (``latentSampleShape``: batch
    2 or 1); ``text_length`` the text encoder's input length (``inputShape.last``)."""
    text_encoder: Callable[[Array], Array]
    unet: Callable[[Array, Array, Array], Array]
    decoder: Callable[[Array], Array]
    latent_sample_shape: tuple[int, ...] = (2, 4, 64, 64)
    text_length: int = 77


@dataclass
class SwiftAppResult:
    image: Array                   # uint8 HxWx3
    denoised_latents: Array        # what was decoded (scheduler.model_outputs[-1]), unscaled
    latents: Array                 # the scheduler's last prev_sample
    timesteps: list[int]
    input_ids: dict[str, Array] = field(default_factory=dict)  # float32 [1, 77] per branch
    unet_calls: int = 0


def run_swift_app(components: SwiftComponents, config: SwiftConfiguration,
                  tokenizer: SwiftBPETokenizer | None = None,
                  latents: Array | None = None) -> SwiftAppResult:
    """``StableDiffusionPipeline.generateImages`` for one text-to-image sample.

    ``latents``: the initial latents ``[1, C, S, S]`` (default: NumPy RNG from the seed, as the
    app's default ``rngType = .numpyRNG``)."""
    config.validate()
    tokenizer = tokenizer or SwiftBPETokenizer.default()
    length = components.text_length
    ids = {"cond": tokenizer.input_ids(config.prompt, length)}
    embedding = np.asarray(components.text_encoder(ids["cond"]), F32)
    cfg = config.guidance_scale >= 1.0
    if cfg:
        ids["uncond"] = tokenizer.input_ids(config.negative_prompt, length)
        negative = np.asarray(components.text_encoder(ids["uncond"]), F32)
        embedding = np.concatenate([negative, embedding], axis=0)  # [negative, prompt]
    hidden = to_hidden_states(embedding)

    scheduler = make_swift_scheduler(config)
    shape = (1, *components.latent_sample_shape[1:])
    if latents is None:
        latents = numpy_rng_latents(config.seed, shape, scheduler.init_noise_sigma)
    latents = np.asarray(latents, F32).reshape(shape)
    denoised = latents
    batch = components.latent_sample_shape[0]
    if not cfg and batch >= 2:
        raise InvalidArgumentError(
            f"guidance_scale {config.guidance_scale} < 1: the app calls the UNet on batch 1, but "
            f"this UNet's sample input is {tuple(components.latent_sample_shape)} (Core ML "
            f"would reject the call); use guidance >= 1")
    calls = 0
    for t in scheduler.time_steps:
        unet_input = np.concatenate([latents, latents]) if cfg else latents
        if batch >= 2 or not cfg:
            ts = np.full((hidden.shape[0],), F32(t), dtype=F32)
            noise = np.asarray(components.unet(unet_input, ts, hidden), F32)
            calls += 1
        else:  # serial batch-1 calls, unconditional first
            ts = np.full((1,), F32(t), dtype=F32)
            noise = np.concatenate([
                np.asarray(components.unet(latents, ts, hidden[i:i + 1]), F32) for i in (0, 1)])
            calls += 2
        if cfg:
            g = F32(config.guidance_scale)
            noise = noise[:1] + g * (noise[1:] - noise[:1])
        latents = scheduler.step(noise, t, latents)
        denoised = scheduler.model_outputs[-1] if scheduler.model_outputs else latents

    z = (denoised / F32(config.decoder_scale_factor)).astype(F32)  # shift factor not passed
    image = np.asarray(components.decoder(z), F32)
    return SwiftAppResult(image=image_to_uint8(image), denoised_latents=denoised,
                          latents=latents, timesteps=list(scheduler.time_steps), input_ids=ids,
                          unet_calls=calls)


# ============================================================================= reference

def diffusers_dpmpp_like_swift(prediction_type: str = "v_prediction", step_count: int = 8,
                               timesteps: Sequence[int] | None = None, **schedule):
    """diffusers ``DPMSolverMultistepScheduler`` set up as DPMSolverMultistepScheduler.swift,
    ``set_timesteps`` already called (with the Swift app's linspace timesteps by default).

    Config: dpmsolver++, solver_order 2, midpoint, lower_order_final, linspace, no karras, no
    thresholding, ``final_sigmas_type="zero"`` (its last step returns the x0 prediction, which
    is what the app decodes), 1000 steps scaled_linear 0.00085..0.012. One override: below 15
    steps the Swift code also takes the second-to-last step at first order (diffusers: second
    order), reproduced by :class:`_SwiftLowerOrderSecond`."""
    cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
               beta_schedule="scaled_linear", prediction_type=prediction_type,
               algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
               lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
               thresholding=False, timestep_spacing="linspace", final_sigmas_type="zero")
    cfg.update(schedule)
    scheduler = _swift_dpm_class()(**cfg)
    if timesteps is None:
        timesteps = SwiftDPMSolverMultistepScheduler(step_count).time_steps
    scheduler.set_timesteps(timesteps=list(timesteps))
    return scheduler


def _swift_dpm_class():
    from diffusers import DPMSolverMultistepScheduler

    class _SwiftLowerOrderSecond(DPMSolverMultistepScheduler):
        def multistep_dpm_solver_second_order_update(self, model_output_list, *args, sample=None,
                                                     noise=None, **kwargs):
            n = len(self.timesteps)
            if self.config.lower_order_final and n < 15 and self.step_index == n - 2:
                return self.dpm_solver_first_order_update(model_output_list[-1], sample=sample,
                                                          noise=noise)
            return super().multistep_dpm_solver_second_order_update(
                model_output_list, *args, sample=sample, noise=noise, **kwargs)
    return _SwiftLowerOrderSecond


@dataclass
class ReferenceResult:
    image: Array          # uint8 HxWx3
    latents: Array        # final latents (= last x0 prediction with final_sigmas_type zero)
    timesteps: list[int]


def reference_dpmpp(model, prompt: str, negative_prompt: str = "", steps: int = 8,
                    guidance: float = 4.5, seed: int = 0, latents: Array | None = None,
                    scaling_factor: float | None = None) -> ReferenceResult:
    """fp32 PyTorch pipeline on the eager model (its own prediction type, v for SnapFusion),
    with :func:`diffusers_dpmpp_like_swift`, our tokenizer (``tokenize``, CLIP cleaning) and
    CFG as in :mod:`mobile_sd.pipeline.reference` (batch 2 ``[uncond, cond]``, guidance > 1).
    ``latents`` default: the app's NumPy RNG draws for ``seed``."""
    import torch

    from mobile_sd.models.text_encoder import TextEncoder
    from mobile_sd.models.tokenizer import tokenize

    spec = model.spec
    sched_spec = spec.scheduler
    scheduler = diffusers_dpmpp_like_swift(
        sched_spec.prediction_type, steps, num_train_timesteps=sched_spec.num_train_timesteps,
        beta_start=sched_spec.beta_start, beta_end=sched_spec.beta_end,
        beta_schedule=sched_spec.beta_schedule)
    text = TextEncoder(model.text_encoder).eval()
    size = spec.unet.sample_size
    shape = (1, spec.decoder.latent_channels, size, size)
    if latents is None:
        latents = numpy_rng_latents(seed, shape)
    x = torch.from_numpy(np.asarray(latents, F32).reshape(shape).copy())
    with torch.no_grad():
        context = text(tokenize(model.tokenizer, [prompt]))
        use_cfg = guidance > 1
        if use_cfg:
            context = torch.cat([text(tokenize(model.tokenizer, [negative_prompt])), context])
        for t in scheduler.timesteps:
            batch = torch.cat([x, x]) if use_cfg else x
            pred = model.unet(batch, torch.full((batch.shape[0],), float(t)), context)
            if use_cfg:
                u, c = pred.chunk(2)
                pred = u + guidance * (c - u)
            x = scheduler.step(pred, t, x).prev_sample
        factor = spec.decoder.scaling_factor if scaling_factor is None else scaling_factor
        image = model.decoder(x / factor)
    return ReferenceResult(image=image_to_uint8(image.numpy()), latents=x.numpy(),
                           timesteps=[int(t) for t in scheduler.timesteps])


def psnr(a: Array, b: Array, peak: float = 255.0) -> float:
    """PSNR in dB between two uint8 images (inf when equal)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


__all__ = ["SwiftConfiguration", "SwiftBPETokenizer", "SwiftDPMSolverMultistepScheduler",
           "SwiftPNDMScheduler", "SwiftComponents", "SwiftAppResult", "make_swift_scheduler",
           "numpy_rng_latents", "image_to_uint8", "to_hidden_states", "run_swift_app",
           "diffusers_dpmpp_like_swift", "reference_dpmpp",
           "ReferenceResult", "psnr"]
