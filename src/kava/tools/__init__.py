"""Tooling around the library, above it: nothing in the library imports these.

    demo.py            `kava demo`: backbone -> No-CoT and KaVa students -> table, on CPU
    sweep.py           `kava sweep`: presets x seeds x grid, locally or as SLURM scripts
    report.py          `kava report`: mean ± std over seeds, CSV, plots
    presets.py         the paper's table of preset values (`kava presets check`)
    inspect_latents.py `kava inspect`: latent KV vs teacher CoT KV, nearest tokens of the latents
"""
