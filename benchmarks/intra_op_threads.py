"""Does the explicit intra-op thread count of setup_devices() matter? Trains the default model for 2 epochs of the
60 000 training images (train_vae, as run() does), each time in a fresh process, alternating TensorFlow's own
choice (setup_devices' call skipped) and the count setup_devices() sets, and prints the seconds of each and
whether both trained the same numbers.

    python3 benchmarks/intra_op_threads.py [ROUNDS]

Each process takes 25-45 s on 2 cores of an Intel Xeon with AMX.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
import tensorflow as tf
import vae_fashion as vf
if sys.argv[1] == "tensorflow":
    tf.config.threading.set_intra_op_parallelism_threads = lambda count: None
config = vf.Config(epochs=2)
vf.setup_devices(config)
data = vf.with_noise(vf.load_fashion_mnist(config), config)
vae = vf.build_distributed_vae(config)
began = time.perf_counter()
history = vf.train_vae(vae, data.x_train_noisy, data.x_train, data.y_train, config, None, 0)
print(json.dumps({{"seconds": time.perf_counter() - began, "history": history.to_dict("records"),
                  "threads": tf.config.threading.get_intra_op_parallelism_threads()}}))
"""


def train(arm: str) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), arm], capture_output=True, text=True,
                            check=True, cwd=ROOT)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(rounds: int) -> None:
    seen = {"tensorflow": [], "explicit": []}
    for _ in range(rounds):
        for arm in seen:
            seen[arm].append(train(arm))
            print(f"{arm:10} intra-op threads {seen[arm][-1]['threads']}: {seen[arm][-1]['seconds']:.1f} s", flush=True)
    same = all(r["history"] == seen["tensorflow"][0]["history"] for runs in seen.values() for r in runs)
    for arm, runs in seen.items():
        print(f"{arm}: " + ", ".join(f"{r['seconds']:.1f}" for r in runs) + " s")
    print(f"every run trained the same history: {same}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
