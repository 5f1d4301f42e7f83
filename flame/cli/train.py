"""flame-train: the LoRA trainer's command line. Training itself is not built yet."""
import sys


def main(argv=None):
    print("flame-train: LoRA training is not built yet (tracked in issue 5: it needs the CUDA/CPU "
          "kernels of issue 3 and the SD 1.5 models of issue 4).\n"
          "What works today: flame-compile dumps traced, differentiated graphs; see README.md.",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
