"""A tiny Wan2.2-I2V pipeline built offline from diffusers' own classes: trained weights shipped in the
package (``model=tiny``, the default, trained by ``wanexp.models.train_tiny``) or seeded random ones
(``model=tiny_random``, for what needs weights without learned structure).

It has the real model's structure (two WanTransformer3DModel experts switched at ``boundary_ratio``,
AutoencoderKLWan, a UMT5 text encoder, a tokenizer, the UniPC flow scheduler, no image encoder) at a
size a 2-core CPU runs in seconds. It is written once with ``save_pretrained`` and then loaded with
the same ``from_pretrained`` code that loads the real checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from wanexp.io import make_temp_dir
from wanexp.models import procedural

# Everything that determines the tiny model's bytes. Changing any value changes the cache key.
TINY_SPEC = {
    "seed": 0,
    "transformer": dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=36,
        out_channels=16, text_dim=64, freq_dim=64, ffn_dim=128, num_layers=4, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, rope_max_seq_len=1024,
    ),
    "vae": dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True, True]),
    "text_encoder": dict(vocab_size=384, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                         relative_attention_num_buckets=8, relative_attention_max_distance=32,
                         dropout_rate=0.0, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                         pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
    # The real Wan2.2-I2V-A14B switches experts at 0.9 of the training timesteps and samples with
    # UniPC on flow-matching sigmas shifted by 5.0 (720p setting).
    "boundary_ratio": 0.9,
    "scheduler": dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                      flow_shift=5.0),
    "tokenizer_corpus_version": 1,
}

# Text the tiny tokenizer is trained on: fixed, so the vocabulary is the same on every machine.
_TOKENIZER_CORPUS = [
    "a person walks through a sunlit park holding a red umbrella",
    "a cat jumps onto a wooden table next to a glass of water",
    "two friends laugh while cooking pasta in a small kitchen",
    "a woman smiles at the camera, her hair moving in the wind",
    "a dog and a ball on green grass, the camera slowly pans left",
    "close-up of a face turning toward the light, soft focus background",
    "three people dance in a crowded street at night with neon signs",
    "a man lifts a cup of coffee and takes a sip by the window",
]

MODEL_INDEX_COMPONENTS = ("transformer", "transformer_2", "vae", "text_encoder", "tokenizer", "scheduler")


def spec_hash(spec: dict = TINY_SPEC) -> str:
    import diffusers
    blob = json.dumps({"spec": spec, "diffusers": diffusers.__version__.split(".")[:2]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _build_tokenizer(corpus=tuple(_TOKENIZER_CORPUS)):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_SPEC["text_encoder"]["vocab_size"], show_progress=False,
        special_tokens=["<pad>", "</s>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    from tokenizers.processors import TemplateProcessing
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=512)


# model=tiny loads these (trained by ``python -m wanexp.models.train_tiny``); model=tiny_random does not.
TRAINED_WEIGHTS = Path(__file__).with_name("tiny_weights")
WEIGHTS = {"tiny": "trained", "tiny_random": "random"}  # model.name -> which weights


def build_tiny_pipeline(weights: str = "random"):
    """Build the tiny pipeline in memory: ``weights="random"``, seeded random weights (the same seed
    gives the same weights, bit for bit); ``"trained"``, those in ``TRAINED_WEIGHTS`` on the same
    architecture, with the tokenizer they were trained with."""
    if weights == "trained":
        return _build_trained_pipeline()
    if weights != "random":
        raise ValueError(f"weights={weights!r} is not one of trained, random")
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    spec = TINY_SPEC
    torch.manual_seed(spec["seed"])
    high_noise = WanTransformer3DModel(**spec["transformer"])
    low_noise = WanTransformer3DModel(**spec["transformer"])
    # diffusers zero-initialises some projections; give every parameter seeded random values so
    # the two experts differ and every quantized layer sees a non-trivial weight.
    for expert in (high_noise, low_noise):
        _randomize(expert, std=0.05)
    vae = AutoencoderKLWan(**spec["vae"])
    text_encoder = UMT5EncoderModel(UMT5Config(**spec["text_encoder"]))
    tokenizer = _build_tokenizer()
    scheduler = UniPCMultistepScheduler(**spec["scheduler"])
    return WanImageToVideoPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
        transformer=high_noise, transformer_2=low_noise, image_encoder=None, image_processor=None,
        boundary_ratio=spec["boundary_ratio"],
    )


EXPERT_FILES = {"high_noise": "transformer.safetensors", "low_noise": "transformer_2.safetensors"}
# present only where train_tiny pre-trained the UMT5 (``text_pretrain_steps``); else the seeded random one stays
TEXT_ENCODER_FILE = "text_encoder.safetensors"


def tokenizer_corpus() -> tuple[str, ...]:
    """The trained proxy's tokenizer corpus: the fixed one plus the procedural clips' vocabulary
    (repeated so its merges win)."""
    return tuple(_TOKENIZER_CORPUS) + tuple(procedural.vocabulary()) * 4


def _build_trained_pipeline():
    """The random pipeline (its frozen UMT5, scheduler and boundary) with the shipped VAE and experts, and the
    shipped UMT5 where one was trained."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import UMT5Config, UMT5EncoderModel

    pipe = build_tiny_pipeline(weights="random")
    pipe.tokenizer = _build_tokenizer(tokenizer_corpus())
    parts = [("vae", AutoencoderKLWan.from_config, "vae.safetensors"),
             ("transformer", WanTransformer3DModel.from_config, EXPERT_FILES["high_noise"]),
             ("transformer_2", WanTransformer3DModel.from_config, EXPERT_FILES["low_noise"])]
    if (TRAINED_WEIGHTS / TEXT_ENCODER_FILE).exists():
        parts.append(("text_encoder", lambda c: UMT5EncoderModel(UMT5Config(**c)), TEXT_ENCODER_FILE))
    for attr, build, fname in parts:
        path = TRAINED_WEIGHTS / fname
        with safe_open(str(path), framework="pt") as f:
            config = json.loads(f.metadata()["config"])
        # diffusers would otherwise take these keys' defaults again: the VAE's latent statistics are among them
        config.pop("_use_default_values", None)
        module = build(config)
        module.load_state_dict(load_file(str(path)), strict=True)
        setattr(pipe, attr, module.eval())
    return pipe


def trained_weights_hash() -> str:
    """A short hash of the shipped weight files: part of the trained checkpoint's cache key."""
    h = hashlib.sha256()
    for path in sorted(TRAINED_WEIGHTS.glob("*.safetensors")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


@torch.no_grad()
def _randomize(module: torch.nn.Module, std: float) -> None:
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            p.normal_(0.0, std)
        elif "norm" in name and name.endswith("weight"):
            p.normal_(1.0, 0.1)
        else:
            p.normal_(0.0, std)


def ensure_tiny_checkpoint(cache_dir: str | Path, weights: str = "random") -> Path:
    """Write the tiny pipeline with ``save_pretrained`` once; return its directory.

    The directory name carries a hash of the spec, so a changed spec never reuses stale weights.
    The write goes to a temporary directory that is renamed into place, so concurrent or crashed
    builds never leave a half-written checkpoint behind.
    """
    from wanexp.models.base import quiet_libraries
    quiet_libraries()
    cache_dir = Path(cache_dir).expanduser()
    if weights == "trained":
        target = cache_dir / f"wan22-i2v-tiny-trained-{spec_hash()}-{trained_weights_hash()}"
    elif weights == "random":
        target = cache_dir / f"wan22-i2v-tiny-{spec_hash()}"
    else:
        raise ValueError(f"weights={weights!r} is not one of trained, random")
    if (target / "model_index.json").exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(cache_dir, ".build-")  # the mode of a plain mkdir, not mkdtemp's 0700
    try:
        build_tiny_pipeline(weights).save_pretrained(tmp, safe_serialization=True)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "model_index.json").exists():  # lost a race only if the other build finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
