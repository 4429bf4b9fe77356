"""Train flowsteer's embedded default model from the photographs bundled with scikit-image.

    pip install -e ".[train]"
    python -m tasks.default_model.train --out guidance/default_model        # every stage, seeded
    python -m tasks.default_model.train --out DIR --stage flow              # one stage (needs the earlier ones)

Stages, each writing into ``--out`` (a diffusers-format folder loaded by ``guidance.load_model``):

1. ``autoencoder``: a small ``AutoencoderKL`` (factor 4, 8 latent channels, no attention: fully convolutional)
   trained with an L1 + KL loss on augmented 64x64 crops; its latent shift and scale are measured on the
   training crops and written to its config (``shift_factor``, ``scaling_factor``). ``decoder`` then fine-tunes
   the decoder alone with an MSE loss (the encoder, hence the latent space, stays fixed).
2. ``flow``: a ``UNet2DModel`` velocity network (no attention) trained with the rectified-flow loss
   ``|| v(x_s, 1000 s) - (eps - z0) ||^2``, x_s = (1 - s) z0 + s eps, s logit-normal (SD3), on latents of
   augmented crops; EMA weights are saved, with a ``FlowMatchEulerDiscreteScheduler`` config.
3. ``classifiers``: two independent image classifiers (transformers ConvNeXt and ResNet at tiny configs, different
   seeds and crops) over four kinds of training photo (:data:`CLASSES`), trained on clean crops only.
4. ``calibrate``: FLAIR's regularisation-weight table measured by :func:`guidance.calibrate` on held-in crops.

Held-out photos (:data:`HELD_OUT`) are never trained on; the evaluation uses them only. Augmentations: random
rescale (a pyramid per photo), crop, flips, 90-degree rotations, brightness / contrast / colour-gain jitter.
Losses are logged to ``<out>/training_log.json`` for the model card.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from guidance.backbones.default import write_manifest

__all__ = ["CLASSES", "HELD_OUT", "TRAIN_PHOTOS", "CropSampler", "held_out_images", "load_photo", "main"]

#: Photos trained on (scikit-image names) and their sampling weights: colour photos are drawn most often.
TRAIN_PHOTOS = {
    "astronaut": 3.0, "rocket": 3.0, "immunohistochemistry": 1.5, "retina": 1.5, "hubble_deep_field": 1.5,
    "camera": 0.5, "moon": 0.5, "clock": 0.5, "coins": 0.5, "cell": 0.5, "page": 0.25, "text": 0.25,
    "brick": 0.5, "grass": 0.5, "gravel": 0.5, "horse": 0.25,
}
#: Photos never trained on (``cat`` is the same photo as ``chelsea``): the evaluation set.
HELD_OUT = ("chelsea", "coffee")
#: Classifier classes: the kind of training photo a crop comes from.
CLASSES = {"retina": ("retina",), "hubble": ("hubble_deep_field",), "tissue": ("immunohistochemistry",),
           "texture": ("brick", "grass", "gravel")}
#: Method options recommended for this model (tuned on held-in photos only), applied by `flowsteer restore`.
#: Held-in astronaut and rocket at 256x256, noise 0.01, 28 steps, PSNR after pixel consistency (mean of the two):
#: FlowChef step 2 / 0.5 / 0.125 / 0.03 / 0.01: SR x4 25.78 / 25.85 / 25.87 / 25.99 / -, box inpainting
#: 14.18 / 14.09 / 17.20 / 22.13 / 21.88, deblurring (sigma 2) step 2 / 0.03: 27.55 / 27.29; PnP-Flow step 2 /
#: 0.5 / 0.125 / 0.03: inpainting - / 18.33 / 21.29 / 20.04, SR x4 26.30 / - / 26.09, deblurring 27.69 / - / 27.74;
#: DPS step 30 / 10 / 3: SR x4 25.98 / - / 25.99, inpainting - / 14.04 / 22.49 (floors: bicubic 25.89, mean-colour
#: fill 20.87, degraded input 25.54). Steps tuned for SR x4 alone (its ‖A‖² is 1/16) are far too large for
#: inpainting and deblurring (‖A‖² = 1): PnP-Flow's step is therefore divided by ‖A‖² (``normalize_step``), 0.125
#: at gain 1 being 2 for SR x4. FLAIR with 2 / 3 / 4 data steps: SR x4 of astronaut 20.4 / 21.2 / 21.6 dB before
#: consistency, in 105 / 39 / 52 s (3 keeps the README's command within a minute).
#: FlowDPS and PSLD (28 steps, astronaut 256x256, SR x4, raw / consistent PSNR): FlowDPS step 4 (its analytic-prior
#: default) 11.77 / 23.40, the official 15 22.33 / 23.43; PSLD 1 / 15: 10.34 / 23.36, 22.42 / 23.26, but box inpainting
#: 12.97 / 16.56 at 1 against 11.67 / 11.84 at 15 (its step is divided by nothing: masks want a gentler one).
RECOMMENDED_OPTIONS: dict[str, dict] = {"flair": {"data_steps": 3}, "flowchef": {"step_size": 0.03},
                                        "pnp_flow": {"step_size": 0.125, "normalize_step": True},
                                        "dps": {"step_size": 3.0}, "flowdps": {"step_size": 15.0},
                                        "psld": {"step_size": 15.0}}
#: Options for one operator, over the above. FlowChef, consistent mean of 4 samples: SR x4 step 0.03 everywhere
#: 26.07, 16 on the steps above noise level 0.75 only 26.36 (8 / 32 up to 0.5: 26.34 / 26.31); deblurring 0.03
#: everywhere 27.65, 1.0 / ‖A‖² above 0.75 27.74; but box inpainting 22.32 against 15.5-15.8 for 0.25-1.0 / ‖A‖²
#: above 0.75: strong early guidance suits blurs and downsamplers, not masks.
_EARLY_FLOWCHEF = {"step_size": 1.0, "normalize_step": True, "stop_sigma": 0.75}
OPERATOR_OPTIONS: dict[str, dict[str, dict]] = {"sr": {"flowchef": _EARLY_FLOWCHEF},
                                                "gaussian_blur": {"flowchef": _EARLY_FLOWCHEF},
                                                "inpaint_box": {"psld": {"step_size": 1.0}}}
#: Restoration settings recommended for this model: its autoencoder (about 28 dB) loses detail the measurement
#: still holds, so the result is made consistent with y in pixel space (the discrepancy principle stops it).
RESTORE_OPTIONS: dict = {"consistency_steps": 100}
#: The longest side the model is meant to work at (it was trained on 64-pixel crops of photos scaled down, and
#: evaluated at 256): `--resize` fits larger images to it.
WORKING_SIZE = 256
#: Peak memory of a restoration above the loaded model, in GiB per megapixel, from `tasks.commands.restore` with SR x4
#: and 2 steps on 2 CPU cores (one thread): 256² 0.45 / 0.41 / 0.47 GiB and 512² 1.49 / 1.32 / 1.60 GiB for FLAIR /
#: FlowChef / DPS, a slope of 5.3-5.7 GiB per megapixel; 6 covers them. Runs estimated past the free memory are refused
#: before they start.
MEMORY_GIB_PER_MEGAPIXEL = 6.0
CROP = 64
LATENT_CHANNELS = 8


def load_photo(name: str) -> torch.Tensor:
    """A scikit-image photo as a (3, H, W) float tensor in [-1, 1] (grayscale replicated to RGB)."""
    try:
        from skimage import data
    except ImportError as error:  # pragma: no cover - the train extra installs it
        raise ImportError("training the default model needs scikit-image: pip install scikit-image") from error
    array = getattr(data, name)()
    image = torch.from_numpy(array.copy())
    if image.dtype == torch.bool:
        image = image.to(torch.uint8) * 255
    image = image.float() / 255.0
    if image.ndim == 2:
        image = image[None].expand(3, -1, -1)
    else:
        image = image[..., :3].permute(2, 0, 1)
    return (image * 2 - 1).contiguous()


def square_resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """The central square of a (3, H, W) image resized to size x size (antialiased bicubic)."""
    h, w = image.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = image[:, top:top + side, left:left + side][None]
    return F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0].clamp(-1, 1)


def held_out_images(size: int = 256) -> torch.Tensor:
    """The evaluation set, (N, 3, size, size): the central square of each held-out photo resized (first, one per
    photo), then native-scale crops at the left and right end of each."""
    squares, crops = [], []
    for name in HELD_OUT:
        photo = load_photo(name)
        squares.append(square_resize(photo, size))
        h, w = photo.shape[-2:]
        top = (h - size) // 2
        crops += [photo[:, top:top + size, :size], photo[:, top:top + size, w - size:]]
    return torch.stack(squares + crops)


class CropSampler:
    """Random augmented crops of a set of photos: a rescale pyramid (short side 160..512 px, never above 1.25x
    the original), random crop, flips, 90-degree rotations and brightness / contrast / per-channel gain jitter."""

    def __init__(self, photos: dict[str, float], size: int = CROP, levels: int = 6, jitter: float = 0.1):
        self.size = size
        self.jitter = jitter
        self.names = list(photos)
        self.weights = torch.tensor([photos[n] for n in self.names], dtype=torch.float64)
        self.pyramids = []
        for name in self.names:
            photo = load_photo(name)
            short = min(photo.shape[-2:])
            sides = torch.logspace(math.log10(160), math.log10(min(512, 1.25 * short)), levels).tolist()
            pyramid = []
            for side in sides:
                scale = max(side, size) / short
                hw = (max(size, round(photo.shape[-2] * scale)), max(size, round(photo.shape[-1] * scale)))
                pyramid.append(F.interpolate(photo[None], size=hw, mode="bilinear", antialias=True,
                                             align_corners=False)[0].clamp(-1, 1))
            self.pyramids.append(pyramid)

    def sample(self, batch: int, generator: torch.Generator, return_index: bool = False):
        """(batch, 3, size, size) crops in [-1, 1] (and the photo index of each when ``return_index``)."""
        index = torch.multinomial(self.weights, batch, replacement=True, generator=generator)
        crops = []
        for i in index.tolist():
            pyramid = self.pyramids[i]
            level = pyramid[int(torch.randint(len(pyramid), (1,), generator=generator))]
            h, w = level.shape[-2:]
            top = int(torch.randint(h - self.size + 1, (1,), generator=generator))
            left = int(torch.randint(w - self.size + 1, (1,), generator=generator))
            crop = level[:, top:top + self.size, left:left + self.size]
            if torch.rand(1, generator=generator) < 0.5:
                crop = crop.flip(-1)
            crop = torch.rot90(crop, int(torch.randint(4, (1,), generator=generator)), dims=(-2, -1))
            if self.jitter:
                u = torch.rand(5, generator=generator) * 2 - 1
                gain = 1 + self.jitter * u[2:5].view(3, 1, 1)
                crop = ((crop * (1 + self.jitter * u[0]) + self.jitter * u[1]) * gain).clamp(-1, 1)
            crops.append(crop)
        out = torch.stack(crops)
        return (out, index) if return_index else out


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (x.clamp(-1, 1) - y).square().flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse)


def cosine_lr(step: int, total: int, peak: float, warmup: int = 100, floor: float = 0.02) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _log(out: Path, stage: str, record: dict) -> None:
    path = out / "training_log.json"
    log = json.loads(path.read_text()) if path.is_file() else {}
    log[stage] = record
    path.write_text(json.dumps(log, indent=1))


# -- stage 1: autoencoder --------------------------------------------------------------------------------------
def build_autoencoder():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=16, sample_size=256,
        mid_block_add_attention=False, scaling_factor=1.0, shift_factor=0.0,
    )


@torch.no_grad()
def evaluate_autoencoder(vae, images: torch.Tensor) -> float:
    """Mean reconstruction PSNR (dB) through the posterior mean."""
    vae.eval()
    values = [psnr(vae.decode(vae.encode(x[None]).latent_dist.mean).sample, x[None]) for x in images]
    vae.train()
    return float(torch.cat(values).mean())


def train_autoencoder(out: Path, steps: int, batch: int, seed: int, lr: float = 1e-3, kl_weight: float = 1e-6):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sampler = CropSampler(TRAIN_PHOTOS)
    held_out = held_out_images()
    vae = build_autoencoder().train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    curve, evals, start = [], [], time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr)
        x = sampler.sample(batch, generator)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(z).sample
        l1 = (reconstruction - x).abs().mean()
        loss = l1 + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        curve.append(round(l1.item(), 5))
        if (step + 1) % 250 == 0 or step + 1 == steps:
            evals.append({"step": step + 1, "held_out_psnr": round(evaluate_autoencoder(vae, held_out), 3),
                          "minutes": round((time.time() - start) / 60, 2)})
            print(f"autoencoder step {step + 1}/{steps}: L1 {sum(curve[-250:]) / len(curve[-250:]):.4f}, "
                  f"held-out PSNR {evals[-1]['held_out_psnr']:.2f} dB, {evals[-1]['minutes']:.1f} min", flush=True)

    # latent statistics on training crops -> config (what SD3's VAE records as shift_factor / scaling_factor)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(sampler.sample(64, generator)).latent_dist.mean for _ in range(16)])
    shift = float(latents.mean())
    scale = float(1.0 / (latents - shift).std())
    vae.register_to_config(shift_factor=round(shift, 5), scaling_factor=round(scale, 5))
    vae.save_pretrained(out / "vae", safe_serialization=True)
    _log(out, "autoencoder", {"steps": steps, "batch": batch, "crop": CROP, "seed": seed, "lr": lr,
                              "kl_weight": kl_weight, "loss_l1": curve, "evaluations": evals,
                              "shift_factor": shift, "scaling_factor": scale,
                              "minutes": round((time.time() - start) / 60, 2)})


def finetune_decoder(out: Path, steps: int, batch: int, seed: int, lr: float = 1e-4):
    """Fine-tune the decoder alone with an MSE loss on the encoder's posterior means (the encoder, and so the
    latent space the flow is trained in, stays fixed): PSNR is an MSE figure, the L1 training left it short."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vae = load_autoencoder(out)
    sampler = CropSampler(TRAIN_PHOTOS)
    held_out = held_out_images()
    vae.requires_grad_(False)
    decoder = [vae.post_quant_conv, vae.decoder]
    for module in decoder:
        module.requires_grad_(True).train()
    optimizer = torch.optim.Adam([p for m in decoder for p in m.parameters()], lr=lr)
    before = evaluate_autoencoder(vae, held_out)
    curve, start = [], time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=20)
        x = sampler.sample(batch, generator)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        loss = (vae.decode(z).sample - x).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        curve.append(round(loss.item(), 6))
    after = evaluate_autoencoder(vae, held_out)
    print(f"decoder fine-tuning: held-out PSNR {before:.2f} -> {after:.2f} dB in {(time.time() - start) / 60:.1f} min",
          flush=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    _log(out, "decoder", {"steps": steps, "batch": batch, "seed": seed, "lr": lr, "loss_mse": curve,
                          "held_out_psnr_before": before, "held_out_psnr_after": after,
                          "minutes": round((time.time() - start) / 60, 2)})


# -- stage 2: velocity network -------------------------------------------------------------------------------
def build_network():
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=CROP // 4, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=1,
        block_out_channels=(64, 128, 128), down_block_types=("DownBlock2D",) * 3,
        up_block_types=("UpBlock2D",) * 3, add_attention=False, norm_num_groups=32,
    )


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def load_autoencoder(out: Path):
    from diffusers import AutoencoderKL

    if not (out / "vae").is_dir():
        raise FileNotFoundError(f"{out / 'vae'} is missing: run the 'autoencoder' stage first")
    return AutoencoderKL.from_pretrained(out / "vae", use_safetensors=True).eval()


@torch.no_grad()
def encode_crops(vae, sampler: CropSampler, count: int, generator: torch.Generator) -> torch.Tensor:
    """Scaled latents z = (E(x) - shift) * scale of ``count`` augmented crops (posterior means)."""
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    chunks = [(vae.encode(sampler.sample(64, generator)).latent_dist.mean - shift) * scale
              for _ in range(math.ceil(count / 64))]
    return torch.cat(chunks)[:count]


def train_flow(out: Path, steps: int, batch: int, seed: int, lr: float = 5e-4, num_latents: int = 24576,
               ema_decay: float = 0.999):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vae = load_autoencoder(out)
    start = time.time()
    latents = encode_crops(vae, CropSampler(TRAIN_PHOTOS), num_latents, generator)
    print(f"encoded {num_latents} crops in {(time.time() - start) / 60:.1f} min", flush=True)
    network = build_network().train()
    ema = copy.deepcopy(network).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=0.0)
    curve = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr)
        z0 = latents[torch.randint(num_latents, (batch,), generator=generator)]
        z0 = torch.rot90(z0, int(torch.randint(4, (1,), generator=generator)), dims=(-2, -1))
        eps = torch.randn(z0.shape, generator=generator)
        s = torch.sigmoid(torch.randn(batch, generator=generator)).view(-1, 1, 1, 1)  # logit-normal(0, 1)
        x_s = (1 - s) * z0 + s * eps
        v = network(x_s, s.flatten() * 1000).sample
        loss = (v - (eps - z0)).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for p_ema, p in zip(ema.parameters(), network.parameters()):
                p_ema.lerp_(p, 1 - decay)
        curve.append(round(loss.item(), 5))
        if (step + 1) % 500 == 0 or step + 1 == steps:
            print(f"flow step {step + 1}/{steps}: loss {sum(curve[-500:]) / len(curve[-500:]):.4f}, "
                  f"{(time.time() - start) / 60:.1f} min", flush=True)
    ema.save_pretrained(out / "unet", safe_serialization=True)
    build_scheduler().save_pretrained(out / "scheduler")
    write_index(out)
    _log(out, "flow", {"steps": steps, "batch": batch, "seed": seed, "lr": lr, "num_latents": num_latents,
                       "ema_decay": ema_decay, "loss": curve, "minutes": round((time.time() - start) / 60, 2)})


def write_index(out: Path) -> None:
    """model_index.json: the components, and the adapter settings and recommended method options that
    ``load_model`` reads from its ``flowsteer`` entry."""
    index = {"_class_name": "FlowsteerDefaultPipeline", "_diffusers_version": _diffusers_version(),
             "unet": ["diffusers", "UNet2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "flowsteer": {"timestep_scale": 1000.0, "method_options": RECOMMENDED_OPTIONS,
                           "operator_options": OPERATOR_OPTIONS, "restore_options": RESTORE_OPTIONS,
                           "working_size": WORKING_SIZE, "memory_gib_per_megapixel": MEMORY_GIB_PER_MEGAPIXEL}}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


# -- stage 3: classifiers ------------------------------------------------------------------------------------
def build_classifier(kind: str):
    """A tiny transformers image classifier over :data:`CLASSES` (``kind``: "convnext" or "resnet")."""
    from transformers import ConvNextConfig, ConvNextForImageClassification, ResNetConfig, ResNetForImageClassification

    labels = {"id2label": dict(enumerate(CLASSES)), "label2id": {name: i for i, name in enumerate(CLASSES)}}
    if kind == "convnext":
        config = ConvNextConfig(num_channels=3, patch_size=2, num_stages=3, hidden_sizes=[24, 48, 96],
                                depths=[1, 1, 2], image_size=CROP, **labels)
        return ConvNextForImageClassification(config)
    if kind == "resnet":
        config = ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1],
                              layer_type="basic", downsample_in_first_stage=False, **labels)
        return ResNetForImageClassification(config)
    raise ValueError(f"unknown classifier kind {kind!r}")


def image_processor():
    from transformers import ViTImageProcessor

    return ViTImageProcessor(do_resize=True, size={"height": CROP, "width": CROP}, do_rescale=True,
                             do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def train_classifier(out: Path, kind: str, name: str, steps: int, batch: int, seed: int, lr: float = 2e-3):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    photos = {photo: 1.0 for group in CLASSES.values() for photo in group}
    label_of = {photo: i for i, group in enumerate(CLASSES.values()) for photo in group}
    sampler = CropSampler(photos)
    labels_by_index = torch.tensor([label_of[photo] for photo in sampler.names])
    model = build_classifier(kind).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    curve, start = [], time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=50)
        x, index = sampler.sample(batch, generator, return_index=True)
        loss = F.cross_entropy(model(pixel_values=x).logits, labels_by_index[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        curve.append(round(loss.item(), 5))
    model.eval()
    with torch.no_grad():
        x, index = sampler.sample(512, torch.Generator().manual_seed(seed + 1000), return_index=True)
        accuracy = float((model(pixel_values=x).logits.argmax(1) == labels_by_index[index]).float().mean())
    model.save_pretrained(out / name, safe_serialization=True)
    image_processor().save_pretrained(out / name)
    print(f"classifier {name} ({kind}): accuracy on fresh crops {accuracy:.3f}, "
          f"{(time.time() - start) / 60:.1f} min", flush=True)
    _log(out, name, {"kind": kind, "steps": steps, "batch": batch, "seed": seed, "lr": lr, "loss": curve,
                     "accuracy_fresh_crops": accuracy, "minutes": round((time.time() - start) / 60, 2)})


# -- stage 4: calibration ------------------------------------------------------------------------------------
def calibrate_default(out: Path, seed: int, count: int = 16, size: int = 256):
    from guidance.features.calibration import calibrate
    from guidance.loading.models import load_model

    model = load_model(str(out))
    names = ("astronaut", "rocket", "immunohistochemistry", "retina")[:count]
    images = torch.stack([square_resize(load_photo(name), size) for name in names])
    if count > len(names):
        sampler = CropSampler({"astronaut": 1.0, "rocket": 1.0, "camera": 0.5, "coins": 0.5}, size=size, jitter=0.0)
        images = torch.cat([images, sampler.sample(count - len(names), torch.Generator().manual_seed(seed))])
    table = calibrate(model, images, generator=torch.Generator().manual_seed(seed), save=False)
    table.metadata.pop("path", None)
    table.save(out / "calibration" / f"crw-{size}x{size}.json")
    _log(out, "calibration", {"images": int(images.shape[0]), "size": size, "weights": table.to_dict()})


STAGES = ("autoencoder", "decoder", "flow", "classifiers", "calibrate")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tasks.default_model.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (the shipped one is guidance/default_model)")
    parser.add_argument("--stage", choices=STAGES + ("all",), default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (the shipped weights used 2)")
    parser.add_argument("--autoencoder-steps", type=int, default=2500)
    parser.add_argument("--decoder-steps", type=int, default=600)
    parser.add_argument("--flow-steps", type=int, default=4000)
    parser.add_argument("--classifier-steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--num-latents", type=int, default=24576, help="encoded crops the flow trains on")
    parser.add_argument("--calibration-images", type=int, default=16)
    parser.add_argument("--calibration-size", type=int, default=256)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = STAGES if args.stage == "all" else (args.stage,)
    for stage in stages:
        began = time.time()
        if stage == "autoencoder":
            train_autoencoder(out, args.autoencoder_steps, args.batch, args.seed)
        elif stage == "decoder":
            finetune_decoder(out, args.decoder_steps, args.batch, args.seed + 5)
        elif stage == "flow":
            train_flow(out, args.flow_steps, 2 * args.batch, args.seed + 1, num_latents=args.num_latents)
        elif stage == "classifiers":
            train_classifier(out, "convnext", "classifier", args.classifier_steps, 32, args.seed + 2)
            train_classifier(out, "resnet", "judge", args.classifier_steps, 32, args.seed + 3)
        else:
            calibrate_default(out, args.seed + 4, args.calibration_images, args.calibration_size)
        write_manifest(out)
        print(f"stage {stage} done in {(time.time() - began) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
