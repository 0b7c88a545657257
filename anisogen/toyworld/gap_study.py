"""The gap study on the toy world: the AnisoAlign paper's §3 and §5 diagnostics with a real CLIP.

1. Embed, with the CLIP under study (default: the bundled ``toy``), *unpaired* train-split data: the
   captions of ``n_text`` scenes and the renders of ``n_images`` other scenes (the same streams as
   :func:`anisogen.toyworld.corpora.write_corpora` with this seed).
2. Embed ``n_pairs`` paired held-out scenes (render + caption of style ``STYLES[i % 7]``).
3. ``gap_report`` on the held-out pairs (§3 table).
4. Fit every aligner registered in :data:`anisogen.align.ALIGNERS` (or a chosen subset) on the unpaired
   train-split embeddings, transform the held-out captions, and compute ``method_report`` (§5 table)
   plus cross-modal retrieval of the substitutes among the first ``n_retrieval`` held-out pairs: for a
   substitute z_i, its nearest held-out image is a hit when caption i describes that scene.
5. A few :data:`DIAGNOSTICS` fits (components of AnisoAlign's initialisation switched off) that explain
   the table; they are reported separately and never enter the verdict.
6. :func:`render_markdown` writes the tables next to the numbers reported in the paper, a per-metric
   verdict of AnisoAlign against ReAlign and C3, and notes computed from the numbers.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np

from .corpora import IMAGE_STREAM, _text_rows
from .quality import encode_captions, encode_pixels, heldout_pairs
from .render import render_array
from .scenes import sample_scenes
from .text import describes_matrix

#: §3 diagnostics reported by the AnisoAlign paper (1M pairs, LLM2CLIP L-14-336, d = 1280).
PAPER_GAP = {"C_lambda": 0.845, "O_q": 0.441, "O_q_random": 0.100, "G_mu": 0.392, "G_Sigma": 0.066,
             "D_center": 1.264, "R_res": 0.89, "A_r": 28.6, "d_eff_ratio": 0.284}
#: §5 diagnostics reported by the paper (10K held-out pairs, k = 20); None = not reported in the text.
PAPER_METHODS = {
    "text (no align)": {"delta_mu": 0.393},
    "c3": {"delta_mu": 0.276, "M_k_Z": 0.410, "M_k_X": 0.075, "Phi": 0.899, "Psi": 0.925, "Omega_k": 0.840},
    "realign": {"delta_mu": 0.012, "M_k_Z": 0.357, "M_k_X": 0.305, "Phi": 0.923, "Psi": 0.836, "Omega_k": None},
    "anisoalign": {"delta_mu": 0.012, "M_k_Z": 0.372, "M_k_X": 0.337, "Phi": 0.941, "Psi": 0.983, "Omega_k": 0.945},
}
#: Extra fits that explain the main table (not tuned, not part of the verdict): AnisoAlign's global
#: initialisation with parts of its per-coordinate reshaping switched to the identity.
#: Label -> (registered aligner, parameter overrides). A fit that fails is reported with its error.
DIAGNOSTICS = {
    "anisoalign-paper, phase_normalization=sum": ("anisoalign-paper", {"phase_normalization": "sum"}),
    "anisoalign-init, radial_map=identity": ("anisoalign-init", {"radial_map": "identity"}),
    "anisoalign-init, v_scaling=identity": ("anisoalign-init", {"v_scaling": "identity"}),
    "anisoalign-init, both identity": ("anisoalign-init", {"radial_map": "identity", "v_scaling": "identity"}),
}
GAP_KEYS = ("C_lambda", "O_q", "O_q_random", "G_mu", "G_Sigma", "D_center", "R_res", "A_r", "d_eff_ratio")
METHOD_KEYS = ("Phi", "Psi", "Omega_k", "delta_mu", "M_k_Z", "M_k_X", "A_r_T")


def study_texts(n_text: int, seed: int = 0) -> list[str]:
    """The unpaired train-split captions of the study: the first ``n_text`` lines of the ``captions.jsonl``
    that :func:`anisogen.toyworld.corpora.write_corpora` writes with this seed."""
    return [row["text"] for row in _text_rows(n_text, seed, False)]


def study_data(model, tokenizer, *, n_text: int, n_images: int, n_pairs: int, seed: int = 0, preprocess=None,
               progress: bool = False) -> dict:
    """Embeddings for the study: ``text``/``image`` unpaired train-split (float32, unit rows),
    ``held_text``/``held_image`` paired held-out, ``scenes``/``captions`` of the held-out pairs."""
    texts = study_texts(n_text, seed)
    image_scenes = sample_scenes(n_images, "train", seed, stream=IMAGE_STREAM)
    scenes, caps = heldout_pairs(n_pairs, seed)
    return {
        "text": encode_captions(model, tokenizer, texts),
        "image": encode_pixels(model, render_array(image_scenes, progress=progress), preprocess=preprocess),
        "held_text": encode_captions(model, tokenizer, [c.text for c in caps]),
        "held_image": encode_pixels(model, render_array(scenes, progress=progress), preprocess=preprocess),
        "scenes": scenes,
        "captions": caps,
    }


def substitute_retrieval(image: np.ndarray, substitute: np.ndarray, hits: np.ndarray) -> dict:
    """R@1 between substitutes and real images of the same rows; ``hits`` (C, S): caption c describes scene s.

    ``z2x_r1``: nearest image of z_i is described by caption i; ``x2z_r1``: nearest substitute of x_j
    comes from a caption describing scene j.
    """
    sim = substitute @ image.T  # (C, S)
    top_x = np.argmax(sim, axis=1)
    top_z = np.argmax(sim, axis=0)
    rows = np.arange(len(substitute))
    return {"z2x_r1": float(hits[rows, top_x].mean()), "x2z_r1": float(hits[top_z, np.arange(len(image))].mean())}


def run_gap_study(model, tokenizer, *, fingerprint: str, n_text: int = 20_000, n_images: int = 10_000,
                  n_pairs: int = 5000, n_retrieval: int = 1000, k: int = 20, seed: int = 0,
                  aligners: list[str] | None = None, params: dict[str, dict] | None = None, preprocess=None,
                  diagnostics: bool = True, progress: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run the study (module doc). Returns ``{"settings", "gap", "methods": {name: report},
    "diagnostics": {label: report}, "timings"}``; ``diagnostics`` are the :data:`DIAGNOSTICS` fits whose
    aligner is part of the run."""
    from ..align import ALIGNERS, fit_aligner
    from ..geometry import gap_report, method_report

    t0, c0 = time.time(), time.process_time()
    names = list(ALIGNERS) if aligners is None else list(aligners)
    unknown = [n for n in names if n not in ALIGNERS]
    if unknown:
        raise ValueError(f"unknown aligners {unknown}; registered: {sorted(ALIGNERS)}")
    params = params or {}
    data = study_data(model, tokenizer, n_text=n_text, n_images=n_images, n_pairs=n_pairs, seed=seed,
                      preprocess=preprocess, progress=progress)
    timings = {"embed_s": round(time.time() - t0, 1)}
    log(f"embedded {n_text} texts, {n_images} images, {n_pairs} held-out pairs in {timings['embed_s']}s")
    x, y = data["held_image"].astype(np.float64), data["held_text"].astype(np.float64)
    gap = gap_report(image=x, text=y, normalize=True)
    n_ret = min(n_retrieval, n_pairs)
    hits = describes_matrix([c.claim for c in data["captions"][:n_ret]], data["scenes"][:n_ret])

    def evaluate(name: str, overrides: dict) -> dict:
        t = time.time()
        aligner = fit_aligner(name, text=data["text"], image=data["image"], seed=seed, model_fingerprint=fingerprint,
                              normalize=True, progress=progress, **overrides)
        fit_s = time.time() - t
        z = aligner.transform(y, normalize=True).astype(np.float64)
        xe = np.asarray(aligner.transform_image(x, normalize=True), dtype=np.float64)
        rep = method_report(image=xe, text=y, substitute=z, k=k, seed=seed)
        rep.update(substitute_retrieval(xe[:n_ret], z[:n_ret], hits))
        rep["fit_s"] = round(fit_s, 1)
        rep["total_s"] = round(time.time() - t, 1)
        rep["params"] = dict(aligner.params)
        chosen = [row for row in aligner.history.get("selection", []) if row.get("chosen")]
        if chosen:
            rep["selected"] = chosen[0]
            rep["selection"] = aligner.history["selection"]
            rep["selection_reference"] = aligner.history["selection_reference"]
        return rep

    methods = {}
    for name in names:
        rep = methods[name] = evaluate(name, params.get(name, {}))
        log(f"{name}: fit {rep['fit_s']:.1f}s, Phi={rep['Phi']:.3f} Psi={rep['Psi']:.3f} "
            f"delta_mu={rep['delta_mu']:.4f} M_k_Z={rep['M_k_Z']:.3f} M_k_X={rep['M_k_X']:.3f} "
            f"z2x_r1={rep['z2x_r1']:.3f}")
    diag = {}
    for label, (name, overrides) in (DIAGNOSTICS.items() if diagnostics else ()):
        if name in names:
            try:
                rep = diag[label] = evaluate(name, {**params.get(name, {}), **overrides})
            except ValueError as exc:  # a diagnostic must not sink the study
                diag[label] = {"error": str(exc)}
                log(f"[diagnostic] {label}: failed: {exc}")
                continue
            log(f"[diagnostic] {label}: Phi={rep['Phi']:.3f} Omega_k={rep['Omega_k']:.3f} M_k_X={rep['M_k_X']:.3f}")
    timings["total_s"] = round(time.time() - t0, 1)
    timings["cpu_s"] = round(time.process_time() - c0, 1)  # all threads of this process
    timings["load_avg_1m"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    timings["cpus"] = os.cpu_count()
    settings = {"fingerprint": fingerprint, "n_text": n_text, "n_images": n_images, "n_pairs": n_pairs,
                "n_retrieval": n_ret, "k": k, "seed": seed, "d": int(x.shape[1]), "q": int(gap.get("q", 0) or 0),
                "aligners": names, "overrides": {n: dict(v) for n, v in params.items()}, "diagnostics": diagnostics}
    return {"settings": settings, "gap": gap, "methods": methods, "diagnostics": diag, "timings": timings}


# --------------------------------------------------------------------------------------------------
# markdown


def _f(v, digits=3) -> str:
    if v is None:
        return "—"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    v = float(v)
    if v != 0 and abs(v) < 10 ** -digits:
        return f"{v:.1e}"
    return f"{v:.{digits}f}"


def _verdicts(methods: dict) -> list[str]:
    """Sentences comparing AnisoAlign with ReAlign and C3 per metric (direction-aware)."""
    better_high = {"Phi": True, "Psi": True, "Omega_k": True, "M_k_Z": True, "M_k_X": True, "z2x_r1": True,
                   "x2z_r1": True, "delta_mu": False, "A_r_T": False}
    lines = []
    if "anisoalign" not in methods:
        return ["AnisoAlign (`anisoalign`) is not part of this run (not registered, or excluded with "
                "--aligners), so the comparison is missing; rerun this script with it."]
    a = methods["anisoalign"]
    for rival in ("realign", "c3"):
        if rival not in methods:
            lines.append(f"`{rival}` is not part of this run; no comparison.")
            continue
        r = methods[rival]
        wins, losses = [], []
        for key, high in better_high.items():
            if key not in a or key not in r:
                continue
            diff = float(a[key]) - float(r[key])
            tol = 1e-3 * max(1.0, abs(float(r[key])))
            if abs(diff) <= tol:
                continue
            ((wins if (diff > 0) == high else losses)).append(f"{key} {_f(a[key])} vs {_f(r[key])}")
        verdict = "beats" if len(wins) > len(losses) else ("ties with" if len(wins) == len(losses) else "does not beat")
        lines.append(f"AnisoAlign {verdict} `{rival}` on this world: better on {len(wins)} metrics "
                     f"({'; '.join(wins) or 'none'}), worse on {len(losses)} ({'; '.join(losses) or 'none'}).")
    return lines


def _same_outputs(a: dict, b: dict) -> bool:
    return all(abs(float(a[k]) - float(b[k])) <= 1e-9 for k in METHOD_KEYS + ("z2x_r1", "x2z_r1") if k in a and k in b)


GROUPS = {"semantic preservation (Φ, Ψ, Ω_k)": ("Phi", "Psi", "Omega_k"), "gap closing (Δµ)": ("delta_mu",),
          "modality mixing (M_k^Z, M_k^X)": ("M_k_Z", "M_k_X"), "residual structure (A_r_T)": ("A_r_T",),
          "cross-modal retrieval (z→x, x→z R@1)": ("z2x_r1", "x2z_r1")}


def _group_summary(a: dict, r: dict) -> str:
    """Per metric group: the summed signed advantage of ``a`` over ``r`` (positive = a better)."""
    sign = {"delta_mu": -1.0, "A_r_T": -1.0}
    parts = []
    for label, keys in GROUPS.items():
        if all(k in a and k in r for k in keys):
            adv = sum(sign.get(k, 1.0) * (float(a[k]) - float(r[k])) for k in keys)
            parts.append(f"{label} {adv:+.3f}")
    return "; ".join(parts)


def analysis_notes(result: dict) -> list[str]:
    """Observations computed from the numbers (every sentence is conditional on the result)."""
    gap, m, s = result["gap"], result["methods"], result["settings"]
    diag = result.get("diagnostics") or {}
    notes = [
        f"The toy CLIP has a real modality gap: G_µ = {_f(gap['G_mu'])} (paper {PAPER_GAP['G_mu']}) and an "
        f"anisotropic paired residual, A_r = {_f(gap['A_r'], 1)} (paper {PAPER_GAP['A_r']}; 1 = isotropic), "
        f"concentrated in few directions (d_eff/d = {_f(gap['d_eff_ratio'])}). Unlike the paper's encoder, the "
        f"two covariance *shapes* also differ a lot (G_Σ = {_f(gap['G_Sigma'])} vs {PAPER_GAP['G_Sigma']}).",
    ]
    if "anisoalign" in m:
        a = m["anisoalign"]
        for rival in ("realign", "c3"):
            if rival in m:
                notes.append(f"Per metric group, AnisoAlign minus `{rival}` (positive = AnisoAlign better): "
                             + _group_summary(a, m[rival]) + ".")
    if "anisoalign" in m and m["anisoalign"].get("selected"):
        a, sel = m["anisoalign"], m["anisoalign"]["selected"]
        line = (f"`anisoalign` chose `{sel['candidate']}` on held-out *fit* texts and images (unpaired; "
                f"Ω_k {_f(sel['Omega_k'])}, Ψ {_f(sel['Psi'])}, M_k^X {_f(sel['M_k_X'])} there, against ReAlign's "
                f"{_f(a['selection_reference']['Omega_k'])}, {_f(a['selection_reference']['Psi'])}, "
                f"{_f(a['selection_reference']['M_k_X'])}; {len(a['selection'])} candidates, selection table above).")
        if "realign" in m:
            r = m["realign"]
            line += (f" On the paired held-out scenes: Ω_k {_f(a['Omega_k'])} vs ReAlign's {_f(r['Omega_k'])} "
                     f"({float(a['Omega_k']) - float(r['Omega_k']):+.4f}; target ≥ −0.01), M_k^X {_f(a['M_k_X'])} vs "
                     f"{_f(r['M_k_X'])} ({float(a['M_k_X']) - float(r['M_k_X']):+.4f}; target ≥ +0.03).")
        notes.append(line)
    if "anisoalign-init" in m:
        same = [
            n
            for n in m
            if n.startswith("anisoalign") and n != "anisoalign-init" and _same_outputs(m[n], m["anisoalign-init"])
        ]
        if same:
            notes.append("Ablations with metrics identical to `anisoalign-init` (global initialisation only): "
                         + ", ".join(f"`{n}`" for n in same) + ". Their refinement objective is stationary at zero "
                         "refinement with a zero-initialised head, so g_eta never moves (see docs/ANISOALIGN.md).")
    phase_sum = diag.get("anisoalign-paper, phase_normalization=sum")
    if "anisoalign-paper" in m and "anisoalign-prior" in m:
        a, pr = m["anisoalign-paper"], m["anisoalign-prior"]
        diff = max(abs(float(a[k]) - float(pr[k])) for k in METHOD_KEYS if k != "A_r_T")
        line = (f"`anisoalign-paper` (L_II + λ_Φ L_Φ with the paper's normalisation, L_Φ ≤ 2/|E|) and "
                f"`anisoalign-prior` (L_II only) differ by at most {_f(diff, 4)} on Φ, Ψ, Ω_k, Δµ and M_k.")
        if phase_sum and "error" not in phase_sum:
            diff2 = max(abs(float(phase_sum[k]) - float(pr[k])) for k in METHOD_KEYS if k != "A_r_T")
            line += (f" With L_Φ summed over E (`phase_normalization=sum`, the default of `anisoalign`) the same fit "
                     f"differs from `anisoalign-prior` by up to {_f(diff2, 4)} (Ω_k {_f(phase_sum['Omega_k'])} vs "
                     f"{_f(pr['Omega_k'])}, M_k^X {_f(phase_sum['M_k_X'])} vs {_f(pr['M_k_X'])}): the phase term now "
                     "acts.")
        notes.append(line)
    if (
        "anisoalign-paper" in m
        and "anisoalign-init" in m
        and not _same_outputs(m["anisoalign-paper"], m["anisoalign-init"])
    ):
        a, i = m["anisoalign-paper"], m["anisoalign-init"]
        mix = (a["M_k_Z"] - i["M_k_Z"]) + (a["M_k_X"] - i["M_k_X"])
        sem = (a["Phi"] - i["Phi"]) + (a["Psi"] - i["Psi"]) + (a["Omega_k"] - i["Omega_k"])
        notes.append(
            f"The trained refinement (`anisoalign-paper` vs `anisoalign-init`) changes modality mixing by {mix:+.3f} "
            f"(M_k^Z + M_k^X), A_r_T by {float(a['A_r_T']) - float(i['A_r_T']):+.2f} and semantic preservation by "
            f"{sem:+.3f} (Φ + Ψ + Ω_k): "
            + ("it buys mixing with semantics." if mix > 0 and sem < 0 else
               "it improves both." if mix > 0 and sem >= 0 else
               "it costs mixing." if mix <= 0 and sem >= 0 else "it makes both worse.")
            + " The prior that drives it is fitted on images alone, so it pulls each caption towards the image "
            "distribution without knowing which image that caption describes.")
    if "anisoalign-init" in m and "realign" in m:
        i, r = m["anisoalign-init"], m["realign"]
        line = (f"Most of the paper-exact AnisoAlign's difference from ReAlign is already in its global "
                f"initialisation: Ω_k is "
                f"{_f(r['Omega_k'])} for ReAlign, {_f(i['Omega_k'])} after the initialisation alone"
                + (f" and {_f(m['anisoalign-paper']['Omega_k'])} after the paper's refinement"
                   if "anisoalign-paper" in m else "")
                + f"; M_k^X is {_f(r['M_k_X'])}, {_f(i['M_k_X'])}"
                + (f" and {_f(m['anisoalign-paper']['M_k_X'])}" if "anisoalign-paper" in m else "") + ".")
        variants = {k: v for k, v in diag.items() if k.startswith("anisoalign-init,") and "error" not in v}
        if variants:
            best = max(variants, key=lambda k: float(variants[k]["Omega_k"]))
            b = variants[best]
            line += (" The diagnostic fits (table above) switch parts of the initialisation's per-coordinate "
                     "reshaping (radial quantile map of the top-r planes, std-ratio scaling of the rest) to the "
                     "identity: "
                     + "; ".join(f"{k.split(', ', 1)[1]} gives Ω_k = {_f(v['Omega_k'])}, M_k^X = {_f(v['M_k_X'])}"
                                 for k, v in variants.items())
                     + f". The largest recovery of Ω_k comes from `{best.split(', ', 1)[1]}`"
                     + (": the reshaping that makes caption statistics match image statistics is what rearranges the "
                        "captions' neighbourhoods, and it is also what buys the extra mixing (M_k^X falls back to "
                        f"{_f(b['M_k_X'])} without it). With covariance shapes this different (G_Σ above), matching "
                        "them moves captions relative to each other."
                        if float(b["Omega_k"]) > float(i["Omega_k"]) + 0.01 and float(b["M_k_X"]) < float(i["M_k_X"])
                        else "."))
        notes.append(line)
    if "realign" in m and "identity" in m:
        r, i = m["realign"], m["identity"]
        notes.append(
            f"Retrieval: a substitute's nearest real image is described by its caption for z→x R@1 = "
            f"{_f(i['z2x_r1'])} with no alignment and {_f(r['z2x_r1'])} after ReAlign"
            + (f", {_f(m['anisoalign']['z2x_r1'])} after AnisoAlign" if "anisoalign" in m else "")
            + ". This toy CLIP already ranks the right images first from the raw caption, so alignment can only "
            "close the gap (Δµ) and mix the modalities (M_k), not make substitutes more specific.")
    if "c3" in m:
        c = m["c3"]
        sigma = (c.get("params") or {}).get("sigma")
        line = (f"C3 adds isotropic Gaussian noise with σ = {_f(sigma, 4)} per dimension (the original recipe), "
                f"norm ≈ σ√d = {_f(float(sigma) * s['d'] ** 0.5, 2)} against unit embeddings at d = {s['d']}: hence "
                f"Φ = {_f(c['Phi'])}, M_k^X = {_f(c['M_k_X'])} (the noisy substitutes form their own cloud, away from "
                f"the images) and "
                f"the low A_r_T = {_f(c['A_r_T'], 1)} (noise whitens the residual); its leftover Δµ = "
                f"{_f(c['delta_mu'])} resembles the paper's 0.276." if sigma is not None else "")
        paper_phi = PAPER_METHODS["c3"]["Phi"]
        if "centroid" in m and float(m["centroid"]["Phi"]) < paper_phi:
            line += (f" C3 cannot be calibrated to the paper's Φ ≈ {paper_phi} here (`calibrate_phi`): its noiseless "
                     f"part, the centroid shift (`centroid`), already has Φ = {_f(m['centroid']['Phi'])}, and noise "
                     "only lowers it.")
        if line:
            notes.append(line)
    return notes


def _runtime(timings: dict) -> str:
    """One line: wall time, and where recorded the CPU time and the machine's load at the end."""
    line = f"{timings['total_s']} s wall-clock in total (embedding {timings['embed_s']} s)"
    if timings.get("cpu_s") is not None:
        line += f", {timings['cpu_s']} s of CPU time (all threads)"
    if timings.get("load_avg_1m") is not None:
        line += f"; 1-minute load average {timings['load_avg_1m']} on {timings.get('cpus')} CPUs at the end"
    return line + "."


def render_markdown(result: dict, *, command: str, notes: list[str] | None = None) -> str:
    """The GAP_STUDY.md text for a :func:`run_gap_study` result."""
    s, gap, methods = result["settings"], result["gap"], result["methods"]
    out = [
        "# Gap study on the toy world",
        "",
        "Generated by `pipelines/gap_study.py`; do not edit by hand. Regenerate with:",
        "",
        "```",
        command,
        "```",
        "",
        f"- CLIP: `{s['fingerprint']}` (d = {s['d']}).",
        f"- Aligners fitted on **unpaired** train-split embeddings: {s['n_text']} caption embeddings and "
        f"{s['n_images']} image embeddings of other scenes.",
        f"- Evaluation on {s['n_pairs']} **paired held-out** scenes (content never seen in training), k = {s['k']}, "
        f"seed {s['seed']}; substitute retrieval among the first {s['n_retrieval']} pairs.",
        f"- Runtime: {_runtime(result['timings'])}",
        "",
        "The paper's numbers come from a different encoder (LLM2CLIP L-14-336, d = 1280) and dataset "
        "(1M pairs); they are shown for orientation only.",
        "",
        "## §3: what the gap is (held-out pairs, no alignment)",
        "",
        "| metric | toy world | paper |",
        "|---|---|---|",
    ]
    labels = {"C_lambda": "spectral correlation C_λ", "O_q": f"subspace overlap O_q (q = {gap.get('q', '')})",
              "O_q_random": "random baseline q/d", "G_mu": "centroid gap G_µ", "G_Sigma": "covariance-shape gap G_Σ",
              "D_center": "mean-corrected distance D_center", "R_res": "residual ratio R_res",
              "A_r": "anisotropy ratio A_r", "d_eff_ratio": "effective dimension d_eff/d"}
    for key in GAP_KEYS:
        if key in gap:
            out.append(f"| {labels[key]} | {_f(gap[key])} | {_f(PAPER_GAP.get(key))} |")
    out += [
        "",
        "## §5: what each aligner does (held-out pairs)",
        "",
        "Φ, Ψ, Ω_k: preservation of the text's own semantics (higher is better). Δµ = ‖µ_z − µ_x‖ (lower is "
        "better). M_k^Z / M_k^X: kNN modality mixing of substitutes and images, normalised by label "
        "permutation (higher = better mixed). A_r_T: anisotropy of the uncentred residual x − z (lower = "
        "less structured residual). z→x / x→z R@1: a substitute's nearest real image (and vice versa) is "
        "described by its caption.",
        "",
        "| aligner | Φ | Ψ | Ω_k | Δµ | M_k^Z | M_k^X | A_r_T | z→x R@1 | x→z R@1 | fit s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rep in methods.items():
        cells = [_f(rep.get(k)) for k in METHOD_KEYS] + [
            _f(rep.get("z2x_r1")),
            _f(rep.get("x2z_r1")),
            _f(rep.get("fit_s"), 1),
        ]
        out.append(f"| `{name}` | " + " | ".join(cells) + " |")
    out += [
        "",
        "Reported in the paper (§5, Fig. 6–7; ≈ values read from the text):",
        "",
        "| method | Φ | Ψ | Ω_k | Δµ | M_k^Z | M_k^X |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rep in PAPER_METHODS.items():
        out.append(
            f"| {name} | "
            + " | ".join(_f(rep.get(k)) for k in ("Phi", "Psi", "Omega_k", "delta_mu", "M_k_Z", "M_k_X"))
            + " |"
        )
    diag = result.get("diagnostics") or {}
    if diag:
        out += ["", "Diagnostic fits (explain the table above; not part of the comparison; defaults otherwise):", "",
                "| fit | Φ | Ψ | Ω_k | Δµ | M_k^Z | M_k^X | A_r_T | z→x R@1 | x→z R@1 | fit s |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for label, rep in diag.items():
            if "error" in rep:
                out.append(f"| {label} | failed: {rep['error']} |" + " |" * 9)
                continue
            cells = [_f(rep.get(k)) for k in METHOD_KEYS] + [_f(rep.get("z2x_r1")), _f(rep.get("x2z_r1")),
                                                             _f(rep.get("fit_s"), 1)]
            out.append(f"| {label} | " + " | ".join(cells) + " |")
    selection = (methods.get("anisoalign") or {}).get("selection")
    if selection:
        ref = methods["anisoalign"]["selection_reference"]
        out += ["", "Automatic selection of `anisoalign` (held-out *fit* texts and images, unpaired; Ω_k and Ψ of "
                "each text against its own substitute, M_k against the held-out images; feasible = Ω_k and Ψ at "
                "least ReAlign's − 0.01; the chosen row has the largest M_k^X among the feasible ones):", "",
                "| candidate | Ω_k | Ψ | M_k^X | M_k^Z | feasible |", "|---|---|---|---|---|---|",
                f"| ReAlign (reference) | {_f(ref['Omega_k'], 4)} | {_f(ref['Psi'], 4)} | {_f(ref['M_k_X'], 4)} | "
                f"{_f(ref['M_k_Z'], 4)} | |"]
        for row in selection:
            name = f"**{row['candidate']}** (chosen)" if row.get("chosen") else row["candidate"]
            out.append(f"| {name} | {_f(row['Omega_k'], 4)} | {_f(row['Psi'], 4)} | {_f(row['M_k_X'], 4)} | "
                       f"{_f(row['M_k_Z'], 4)} | {'yes' if row.get('feasible') else 'no'} |")
    overrides = s.get("overrides") or {}
    out += ["", "Parameters: every aligner runs with its registered `default_params` (documented in "
            "`anisogen/align/`; AnisoAlign's in `anisogen/align/aniso/aligner.py`), nothing tuned on this "
            "evaluation" + (", except the `--set` overrides " + ", ".join(
                f"`{n}.{k}={v}`" for n, kv in overrides.items() for k, v in kv.items()) if any(overrides.values())
                else "") + ". Values used:", "", "<details><summary>parameters per aligner</summary>", ""]
    shown: dict[str, dict] = {}
    for name, rep in methods.items():
        params = rep.get("params") or {}
        twin = next((n for n, prev in shown.items() if params and prev == params), None)
        out.append(f"- `{name}`: " + (f"same as `{twin}`" if twin else
                                      ", ".join(f"{k}={v}" for k, v in sorted(params.items())) or "none"))
        shown[name] = params
    out += ["", "</details>"]
    out += ["", "## Does AnisoAlign beat ReAlign and C3 here?", ""]
    out += [f"- {line}" for line in _verdicts(methods)]
    notes = analysis_notes(result) + list(notes or [])
    out += ["", "## Notes (computed from the numbers above)", ""] + [f"- {n}" for n in notes]
    out.append("")
    return "\n".join(out)
