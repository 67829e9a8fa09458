"""The token-level agreement check of the GPU tests: two runs of the same greedy requests (batched vs alone,
TP=2 vs TP=1, preempted vs not), both with top-20 logprobs.

Up to and including the first divergence both runs condition on the same tokens, so their next-token
distributions must match up to bf16 noise: at EVERY such position the top-20 lists share >= 10 tokens and
their logprobs differ by < 1 nat (random weights: logits spread over several nats, bf16 noise ~0.2-0.3 nats;
a lost partial sum, another request's KV pages or a wrong position move them by nats). At the first
divergence the candidate's token is in the reference's top 20, within 1 nat of its choice (random weights
give near-ties that bf16 rounding flips, so token identity itself is reported, not required). Each test
that uses it has a negative control: a deliberately broken engine that this check rejects."""


def check_agreement(ref, got, what: str) -> dict:
    """ref, got: GenerationResult lists (token_ids, logprobs, top_logprobs). Raises AssertionError naming the
    request and position; returns the statistics it printed."""
    assert len(ref) == len(got), f"{what}: {len(ref)} reference results, {len(got)} candidates"
    same = sum(a.token_ids == b.token_ids for a, b in zip(ref, got))
    worst, overlaps = 0.0, []
    for i, (a, b) in enumerate(zip(ref, got)):
        assert len(a.token_ids) >= 1 and len(b.token_ids) >= 1, f"request {i}: an empty output"
        assert len(a.top_logprobs) == len(a.token_ids) and len(b.top_logprobs) == len(b.token_ids), \
            f"request {i}: logprobs missing (ask for logprobs=20)"
        n = min(len(a.token_ids), len(b.token_ids))
        k = next((k for k in range(n) if a.token_ids[k] != b.token_ids[k]), n - 1)
        for j in range(k + 1):                  # positions conditioned on the same prefix
            ta, tb = dict(a.top_logprobs[j]), dict(b.top_logprobs[j])
            common = ta.keys() & tb.keys()
            overlaps.append(len(common))
            assert len(common) >= 10, f"request {i} position {j}: top-20 lists share {len(common)} tokens"
            d = max(abs(ta[t] - tb[t]) for t in common)
            worst = max(worst, d)
            assert d < 1.0, f"request {i} position {j}: logprobs differ by {d:.3f} nats"
        if a.token_ids != b.token_ids and k < n:
            top = dict(a.top_logprobs[k])
            assert b.token_ids[k] in top, f"request {i}: token {k} ({b.token_ids[k]}) left the reference's top 20"
            assert a.logprobs[k] - top[b.token_ids[k]] < 1.0, f"request {i}: token {k} more than 1 nat off"
    stats = {"identical": same, "requests": len(ref), "positions": len(overlaps),
             "overlap_min": min(overlaps), "overlap_mean": sum(overlaps) / len(overlaps), "max_diff_nats": worst}
    print(f"\n{what}: {same}/{len(ref)} requests token-identical; {len(overlaps)} positions on a shared prefix: "
          f"top-20 overlap min {stats['overlap_min']} mean {stats['overlap_mean']:.1f}, max |logprob difference| "
          f"{worst:.3f} nats")
    return stats
