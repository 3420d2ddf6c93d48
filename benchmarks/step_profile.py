"""Profile a few decode steps with torch.profiler and summarise them as tables.

What it reports, per step (the mean over the profiled steps):
- every GPU kernel by name: launches, total and mean microseconds, share of kernel time;
- the GPU's busy share: the union of kernel intervals over the steps' wall time (the host
  clock, device synchronised before and after);
- the largest gaps between consecutive kernels, with the kernel before each: where the GPU
  waits for the host (Python work, a read-back, a launch that a graph would hide).

On a CPU (the dry run) there are no kernels; the top-level CPU ops stand in, so the path
is exercised without a GPU. The tables are Markdown, for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import time


def profile_steps(one_step, steps: int, sync) -> dict:
    """Run `one_step` `steps` times under torch.profiler; -> the summary dict."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    gpu = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    sync.sync()
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            one_step()
        sync.sync()
        wall_us = (time.perf_counter() - t) * 1e6
    want = torch.autograd.DeviceType.CUDA if gpu else torch.autograd.DeviceType.CPU
    events = [e for e in prof.events() if e.device_type == want
              and (gpu or e.cpu_parent is None)]        # CPU: top-level ops only
    return summarise(events, steps, wall_us, "kernel" if gpu else "CPU op (dry run)")


def summarise(events, steps: int, wall_us: float, what: str) -> dict:
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in events)
    by_name: dict[str, list] = {}
    for start, end, name in spans:
        by_name.setdefault(name, []).append(end - start)
    busy, cur_s, cur_e, prev = 0.0, None, None, None
    gaps = []
    for start, end, name in spans:
        if cur_e is None or start > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
                gaps.append((start - cur_e, prev))
            cur_s, cur_e = start, end
        else:
            cur_e = max(cur_e, end)
        prev = name
    if cur_e is not None:
        busy += cur_e - cur_s
    total = sum(sum(v) for v in by_name.values()) or 1.0
    rows = sorted(((name, len(d) / steps, sum(d) / steps, sum(d) / len(d), 100 * sum(d) / total)
                   for name, d in by_name.items()), key=lambda r: -r[2])
    return {"what": what, "steps": steps, "wall_us_per_step": wall_us / steps,
            "busy_us_per_step": busy / steps, "busy_share": busy / wall_us if wall_us else 0.0,
            "launches_per_step": len(spans) / steps,
            "rows": [dict(zip(("name", "count", "us", "mean_us", "pct"), r)) for r in rows],
            "gaps": [{"us": g, "after": n} for g, n in sorted(gaps, reverse=True)[:8]]}


def markdown(p: dict, title: str, top: int = 25) -> str:
    lines = [f"### {title}", "",
             f"{p['steps']} steps profiled: {p['wall_us_per_step']:.1f} us per step wall, "
             f"{p['launches_per_step']:.0f} {p['what']}s per step, busy "
             f"{p['busy_us_per_step']:.1f} us = {100 * p['busy_share']:.1f} % of the step", "",
             f"| {p['what']} | per step | us per step | mean us | % of busy |",
             "|---|---:|---:|---:|---:|"]
    for r in p["rows"][:top]:
        lines.append(f"| `{r['name'][:90]}` | {r['count']:.1f} | {r['us']:.1f} | "
                     f"{r['mean_us']:.2f} | {r['pct']:.1f} |")
    if len(p["rows"]) > top:
        rest = p["rows"][top:]
        lines.append(f"| ({len(rest)} more) | {sum(r['count'] for r in rest):.1f} | "
                     f"{sum(r['us'] for r in rest):.1f} | | {sum(r['pct'] for r in rest):.1f} |")
    if p["gaps"]:
        lines += ["", "largest idle gaps between consecutive " + p["what"] + "s (all steps):", "",
                  "| gap us | after |", "|---:|---|"]
        lines += [f"| {g['us']:.1f} | `{g['after'][:90]}` |" for g in p["gaps"]]
    return "\n".join(lines) + "\n"
