"""Run the vlmkit CLI, pausing 3 s after the first step checkpoint is in place and saying so.

The fault tests use the pause to change the world under the run at a known point (fill its disk, lower its
file-size limit); the faults themselves are real: the run's next writes fail in the kernel.
"""
import sys
import time

import vlmkit.train.checkpoint as checkpoint

_save_checkpoint = checkpoint.save_checkpoint
_saved = []


def save_then_pause(directory, *args, **kwargs):
    result = _save_checkpoint(directory, *args, **kwargs)
    if not _saved:
        print(f"first checkpoint in place: {directory}", flush=True)
        time.sleep(3)
    _saved.append(directory)
    return result


checkpoint.save_checkpoint = save_then_pause

if __name__ == "__main__":
    from vlmkit.cli import main

    sys.exit(main(sys.argv[1:]))
