"""Run the vlmkit CLI with step checkpoints that pause halfway through being written.

Used by the kill tests to SIGKILL a run while a checkpoint is being written: the optimizer file lands in
the temporary directory, then the writer sleeps before the directory is renamed into place.
"""
import sys
import time

import vlmkit.train.checkpoint as checkpoint

_save_file = checkpoint.save_file


def slow_save_file(tensors, path, *args, **kwargs):
    _save_file(tensors, path, *args, **kwargs)
    print(f"checkpoint half-written: {path}", flush=True)
    time.sleep(60)


checkpoint.save_file = slow_save_file

if __name__ == "__main__":
    from vlmkit.cli import main

    sys.exit(main(sys.argv[1:]))
