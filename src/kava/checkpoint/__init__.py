"""What kava keeps on disk, and reading it back.

    saved.py   a saved model (a run's best/ and final/): layout, `save_model`, the backbone read back strictly
    load.py    every way to get a model: from a config (pretrained, from scratch, `model.init_from`), from a
               saved checkpoint, from an exported directory (`load_any`, behind `kava.load`)
    state.py   the training state of `checkpoints/step_<n>/`: trainable tensors, optimizer, RNGs, counters
               (the data position is a pure function of the step), written atomically; resume checks
    rundir.py  the run directory: its file names (`RunDir`, the only module that spells them), state.json,
               the own-tokenizer rule, extending a run, its name, the lock against a second trainer,
               meta.json's versions and git
    export.py  `kava export`: a plain Hugging Face directory

Import the submodule you need; this package file imports nothing.
"""
