"""Pure sampling functions on logits for the AR baseline and the TiDAR verifiers.

Shapes: V vocabulary, K drafts, N independent rows (batch). Every function here is a pure function of its
tensors and a `torch.Generator`: no model, no cache, no global RNG, so the decoder, the tests and a notebook
get the same tokens from the same seed. Probabilities are float32 (float64 if the logits are float64).

Two verifiers share one acceptance rule (speculative sampling, Leviathan et al. 2023 / Chen et al. 2023):
- lossless: the verifier distribution p is the AR model's; emitted tokens are distributed exactly as AR
  sampling with the same temperature / top-p.
- logit mixing: p is built from (1 - w) * ar_logits + w * diff_logits; w = 0 is the lossless verifier
  (same tokens, same RNG use), larger w accepts more drafts and moves the output towards the drafter.
"""

import math

import torch

__all__ = [
    "probs_from_logits",
    "sample",
    "verify_lossless",
    "verify_lossless_batch",
    "mix_logits",
    "mixing_verifier_probs",
    "verify_mixing",
    "verifier_and_drafter_probs",
]


def _check_temperature_top_p(temperature: float, top_p: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filtering), got {top_p!r}")


def probs_from_logits(logits_V: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """Next-token probabilities (..., V) from logits (..., V): temperature, then nucleus (top-p) filtering.

    temperature 0 is greedy: a one-hot at the argmax (lowest index on ties), top_p is then irrelevant.
    Top-p keeps, per row, the smallest set of most likely tokens whose mass is >= top_p (the token that
    crosses the threshold is kept) and renormalises over it.
    """
    _check_temperature_top_p(temperature, top_p)
    logits = logits_V if logits_V.dtype == torch.float64 else logits_V.float()
    if temperature == 0:
        one_hot = torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1])
        return one_hot.to(logits.dtype)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1:
        return probs
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep_sorted = mass_before < top_p  # always keeps the most likely token (mass_before == 0)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    filtered = probs * keep
    return filtered / filtered.sum(dim=-1, keepdim=True)


def sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row of probs (..., V) -> int64 tensor of shape probs.shape[:-1] (0-dim for one row).

    Uses torch.multinomial with an explicit generator (on the same device as probs) for reproducibility.
    """
    flat_NV = probs.reshape(-1, probs.shape[-1])
    tokens_N = torch.multinomial(flat_NV, 1, generator=generator).squeeze(-1)
    return tokens_N.reshape(probs.shape[:-1])


def verify_lossless_batch(
    p_NKV: torch.Tensor, q_NKV: torch.Tensor, drafts_NK: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative-sampling verification of N independent rows of K drafts each.

    p_NKV: (N, K+1, V) verifier distributions at the K draft positions plus the bonus position.
    q_NKV: (N, K, V) drafter distributions the drafts were sampled from. drafts_NK: (N, K) int64.
    Returns (num_accepted_N, next_token_N), int64: drafts[:num_accepted] are kept, then next_token.

    Rule: accept draft d_i with probability min(1, p_i(d_i) / q_i(d_i)), in order; at the first rejection i
    sample from normalize(max(0, p_i - q_i)); if all K are accepted sample the bonus token from p_K.
    Why the output is exactly p: P(emit x at i) = min(p_i, q_i)(x) [accepted] + max(0, p_i - q_i)(x)
    [rejected, total mass 1 - sum(min(p_i, q_i)), times the normalised residual] = p_i(x), for any q_i.
    Edge: if max(0, p_i - q_i) sums to 0 then p_i == q_i, so a rejection has probability 0 and can only come
    from rounding or a draft outside both supports; we then sample from p_i, which is still exact.
    At temperature 0 (p one-hot) this accepts exactly the drafts equal to the AR argmax and emits the
    argmax at the first mismatch, whatever q is.
    RNG use is fixed: one uniform per draft (torch.rand (N, K)) then one multinomial draw per row.
    """
    if p_NKV.dim() != 3 or q_NKV.dim() != 3 or drafts_NK.dim() != 2:
        raise ValueError(
            f"verify_lossless_batch wants p (N, K+1, V), q (N, K, V), drafts (N, K); got p {tuple(p_NKV.shape)}, "
            f"q {tuple(q_NKV.shape)}, drafts {tuple(drafts_NK.shape)}"
        )
    N, K = drafts_NK.shape
    V = p_NKV.shape[-1]
    if p_NKV.shape != (N, K + 1, V) or q_NKV.shape != (N, K, V):
        raise ValueError(
            f"with drafts of shape (N={N}, K={K}) p must be (N, K+1, V) = ({N}, {K + 1}, V) and q (N, K, V) = "
            f"({N}, {K}, V) with the same V; got p {tuple(p_NKV.shape)}, q {tuple(q_NKV.shape)}"
        )
    drafts_NK1 = drafts_NK.long().unsqueeze(-1)
    p_draft_NK = p_NKV[:, :K].gather(-1, drafts_NK1).squeeze(-1)
    q_draft_NK = q_NKV.gather(-1, drafts_NK1).squeeze(-1)
    u_NK = torch.rand((N, K), generator=generator, dtype=p_NKV.dtype, device=p_NKV.device)
    # u < p/q written without the division: q(d) = 0 < p(d) accepts, p(d) = 0 always rejects.
    accept_NK = u_NK * q_draft_NK < p_draft_NK
    num_accepted_N = accept_NK.long().cumprod(dim=-1).sum(dim=-1)  # only a contiguous prefix counts

    # Row n samples at position num_accepted[n]; padding q with zeros at the bonus position K makes the
    # residual there p_K itself, so "all accepted" needs no special case.
    rows_N = torch.arange(N, device=p_NKV.device)
    q_padded_NKV = torch.cat([q_NKV.to(p_NKV.dtype), q_NKV.new_zeros((N, 1, V), dtype=p_NKV.dtype)], dim=1)
    p_next_NV = p_NKV[rows_N, num_accepted_N]
    residual_NV = (p_next_NV - q_padded_NKV[rows_N, num_accepted_N]).clamp_min(0)
    mass_N1 = residual_NV.sum(dim=-1, keepdim=True)
    residual_NV = torch.where(mass_N1 > 0, residual_NV / mass_N1.clamp_min(torch.finfo(p_NKV.dtype).tiny), p_next_NV)
    next_token_N = sample(residual_NV, generator)
    return num_accepted_N, next_token_N


def verify_lossless(
    p_KV: torch.Tensor, q_KV: torch.Tensor, drafts_K: torch.Tensor, generator: torch.Generator
) -> tuple[int, int]:
    """Lossless verification of one row: p (K+1, V), q (K, V), drafts (K,) -> (num_accepted, next_token).

    Same rule, proof and RNG use as `verify_lossless_batch` with N = 1: the emitted tokens are distributed
    exactly as sampling the AR distributions p one token at a time.
    """
    num_accepted_N, next_token_N = verify_lossless_batch(p_KV[None], q_KV[None], drafts_K[None], generator)
    return int(num_accepted_N[0]), int(next_token_N[0])


def mix_logits(ar_logits: torch.Tensor, diff_logits: torch.Tensor, weight: float) -> torch.Tensor:
    """(1 - weight) * ar_logits + weight * diff_logits, weight in [0, 1] (the logit-mixing verifier's blend).

    weight 0 returns ar_logits itself and weight 1 diff_logits itself (not copies), so -inf logits never
    become NaN through 0 * -inf and w = 0 is bit-identical to the lossless verifier.
    """
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
        raise ValueError(f"mixing weight must be a number in [0, 1] (0 = lossless, 1 = drafter logits), got {weight!r}")
    if ar_logits.shape != diff_logits.shape:
        raise ValueError(
            f"mix_logits needs AR and diffusion logits of one shape, got {tuple(ar_logits.shape)} and "
            f"{tuple(diff_logits.shape)}"
        )
    if weight == 0:
        return ar_logits
    if weight == 1:
        return diff_logits
    return (1 - weight) * ar_logits + weight * diff_logits


def mixing_verifier_probs(
    ar_logits_KV: torch.Tensor,
    diff_logits_KV: torch.Tensor,
    weight: float,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Verifier distributions (..., K+1, V) of the logit-mixing sampler.

    ar_logits (..., K+1, V): AR logits at the K draft positions and the bonus position.
    diff_logits (..., K, V): the diffusion logits the K drafts came from. The K draft positions use the blend
    `mix_logits(ar, diff, weight)`; the bonus position has no diffusion logits and uses the AR logits alone.
    """
    K = diff_logits_KV.shape[-2]
    if ar_logits_KV.shape[:-2] != diff_logits_KV.shape[:-2] or ar_logits_KV.shape[-2] != K + 1:
        raise ValueError(
            f"ar_logits must be (..., K+1, V) and diff_logits (..., K, V); got {tuple(ar_logits_KV.shape)} and "
            f"{tuple(diff_logits_KV.shape)}"
        )
    mixed_KV = mix_logits(ar_logits_KV[..., :K, :], diff_logits_KV, weight)
    logits_KV = torch.cat([mixed_KV, ar_logits_KV[..., K:, :]], dim=-2)
    return probs_from_logits(logits_KV, temperature, top_p)


def verify_mixing(
    ar_logits_KV: torch.Tensor,
    diff_logits_KV: torch.Tensor,
    q_KV: torch.Tensor,
    drafts_K: torch.Tensor,
    weight: float,
    generator: torch.Generator,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> tuple[int, int]:
    """Logit-mixing verification of one row -> (num_accepted, next_token).

    The lossless acceptance rule against q (K, V) with the verifier p = `mixing_verifier_probs(...)`. The
    output follows p, not the AR model: more drafts accepted, slightly different text. weight 0 gives exactly
    `verify_lossless(probs_from_logits(ar_logits, temperature, top_p), q, drafts, generator)`, token for token.
    With weight 1 and q built from diff_logits with the same temperature/top-p, p == q at every draft
    position, so every draft is accepted (up to float rounding).
    """
    p_KV = mixing_verifier_probs(ar_logits_KV, diff_logits_KV, weight, temperature, top_p)
    return verify_lossless(p_KV, q_KV, drafts_K, generator)


def verifier_and_drafter_probs(
    ar_logits_KV: torch.Tensor,
    diff_logits_KV: torch.Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(p (..., K+1, V), q (..., K, V)) with one temperature and top-p applied to both streams.

    q is the drafter distribution (sample drafts from it), p the verifier's (AR when weight is 0, the
    logit-mixing blend otherwise). Works with or without leading batch dimensions. A decoder that wants a
    separate drafter temperature builds q with `probs_from_logits` itself; the verifiers stay exact for
    whatever q the drafts were actually sampled from.
    """
    q_KV = probs_from_logits(diff_logits_KV, temperature, top_p)
    p_KV = mixing_verifier_probs(ar_logits_KV, diff_logits_KV, weight, temperature, top_p)
    return p_KV, q_KV
