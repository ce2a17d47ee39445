"""Hyper-parameters of the CSKV compressor, validated when the config is built."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..base import CompressorConfig

QUANT_BITS = (None, 8, 4)
INITS = ("svd", "asvd")
KEY_SPACES = ("pre_rope", "post_rope")
POST_ROPE_FACTORS = ("rotation_invariant", "pca")


def _check_density(value: float, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{what} must be a number in (0, 1] (the fraction of K/V channels kept as latent), "
                         f"got {value!r}")


@dataclass
class CSKVConfig(CompressorConfig):
    """CSKV: channel shrinking of the K/V cache (Wang et al. 2024, arXiv 2409.10593).

    Each layer's ``k_proj`` / ``v_proj`` gets a down-projection to a latent of rank
    ``round(density * out_features)`` and an up-projection back. The cache keeps latents of old
    tokens and full keys/values of the last ``window`` tokens; latents may be quantized to 8 or 4
    bits (asymmetric, per token and per group of ``quant_group_size`` channels).

    ``key_space`` says what a key latent is: ``pre_rope``, ``down(x)`` (keys rebuilt and rotated at their
    positions when read, Palu's layout); ``post_rope``, a projection of the rotated key itself, so that a decode
    step scores the query against the latents without rebuilding a key (fused CPU kernels for 8-bit latents).
    """

    density: float = field(default=0.5, metadata={
        "help": "fraction of K (and V) channels kept in the latent, every layer, in (0, 1]"})
    value_density: float | None = field(default=None, metadata={
        "help": "V's own density (default: the same as density). Values are far less low-rank than keys: on "
                "SmolLM2-135M, 1.0 with 4-bit latents keeps perplexity within 2% where 0.5 quadruples it "
                "(benchmarks/results/cskv_ablation)"})
    layer_densities: list[float] | None = field(default=None, metadata={
        "help": "per-layer densities for K and V, one per layer (overrides density)"})
    window: int = field(default=32, metadata={"help": "recent tokens kept as full-precision K/V (the local branch)"})
    quant_bits: int | None = field(default=None, metadata={
        "help": "None (latents in the model dtype), 8 or 4 (packed, two per byte)"})
    quant_group_size: int = field(default=32, metadata={"help": "latent channels sharing one scale / zero point"})
    key_space: str = field(default="pre_rope", metadata={
        "help": "pre_rope: a key latent is down(x), rebuilt and rotated when read; post_rope: a projection of the "
                "rotated key onto its query-weighted principal directions (calibrated on training texts at "
                "positions up to max_context_tokens), read in rank space: a decode step never rebuilds a key"})
    post_rope_factors: str = field(default="rotation_invariant", metadata={
        "help": "how post-RoPE key factors are fitted: rotation_invariant (subspaces RoPE maps onto themselves, "
                "chosen by query-weighted key energy per frequency: a latent loses the same at every position) or "
                "pca (query-weighted PCA of rotated keys at random positions: fits no position exactly; pass keys "
                "0.53 vs 0.76 at 1k, benchmarks/results/cskv_ablation)"})
    init: str = field(default="svd", metadata={
        "help": "factor initialization: svd, or asvd (activation-aware, calibrated on training texts)"})
    asvd_alpha: float = field(default=0.5, metadata={
        "help": "ASVD scaling exponent on the mean |activation| of each input channel, in [0, 2]"})

    def __post_init__(self) -> None:
        _check_density(self.density, "density")
        if self.value_density is not None:
            _check_density(self.value_density, "value_density")
        if self.layer_densities is not None:
            if not isinstance(self.layer_densities, (list, tuple)) or not self.layer_densities:
                raise ValueError(f"layer_densities must be a non-empty list, got {self.layer_densities!r}")
            for i, d in enumerate(self.layer_densities):
                _check_density(d, f"layer_densities[{i}]")
            self.layer_densities = [float(d) for d in self.layer_densities]
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"window must be an integer >= 0 (recent tokens kept in full), got {self.window!r}")
        if self.quant_bits not in QUANT_BITS or isinstance(self.quant_bits, bool):
            raise ValueError(f"quant_bits must be one of {list(QUANT_BITS)} (None = no quantization), "
                             f"got {self.quant_bits!r}")
        if isinstance(self.quant_group_size, bool) or not isinstance(self.quant_group_size, int) \
                or self.quant_group_size < 1:
            raise ValueError(f"quant_group_size must be a positive integer, got {self.quant_group_size!r}")
        if self.key_space not in KEY_SPACES:
            raise ValueError(f"key_space must be one of {list(KEY_SPACES)}, got {self.key_space!r}")
        if self.post_rope_factors not in POST_ROPE_FACTORS:
            raise ValueError(f"post_rope_factors must be one of {list(POST_ROPE_FACTORS)}, "
                             f"got {self.post_rope_factors!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {list(INITS)}, got {self.init!r}")
        if not 0.0 <= float(self.asvd_alpha) <= 2.0:
            raise ValueError(f"asvd_alpha must be in [0, 2], got {self.asvd_alpha!r}")

    @property
    def post_rope(self) -> bool:
        return self.key_space == "post_rope"

    def densities(self, num_layers: int) -> list[tuple[float, float]]:
        """(key density, value density) for each of ``num_layers`` layers."""
        if self.layer_densities is not None:
            if len(self.layer_densities) != num_layers:
                raise ValueError(f"layer_densities has {len(self.layer_densities)} entries but the base model "
                                 f"has {num_layers} layers")
            return [(d, d) for d in self.layer_densities]
        value = self.density if self.value_density is None else self.value_density
        return [(self.density, value)] * num_layers


def rank_for(density: float, out_features: int) -> int:
    """Latent rank kept for a projection with ``out_features`` outputs."""
    return max(1, min(out_features, round(density * out_features)))
