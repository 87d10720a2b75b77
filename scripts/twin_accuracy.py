"""Can a model tell a synthetic scene from its hard-negative twins? (pvl_search.experiments.twins)

    python scripts/twin_accuracy.py --model pvl_search/model/weights/tiny-synth \
        --captions /work/data/synth2000/captions.json --split test --cache /tmp/test-cache
"""

from __future__ import annotations

import argparse
import json

from pvl_search.experiments.twins import twin_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--captions", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--cache", required=True, help="frame cache folder (reused when complete)")
    args = parser.parse_args()
    print(json.dumps(twin_accuracy(args.model, args.captions, args.split, args.cache), indent=2))


if __name__ == "__main__":
    main()
