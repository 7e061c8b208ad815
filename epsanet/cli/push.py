"""``epsanet push OUT_DIR REPO_ID``: publish a converted folder and print its registry entry."""
import argparse
import json

COMMAND = 'push'


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        COMMAND, help='publish an `epsanet convert` folder to the Hugging Face Hub',
        description='Uploads OUT_DIR with huggingface_hub (token from HF_TOKEN or `hf auth login`) and prints '
                    'the entry to add to weights/registry.json, pinned to the uploaded commit.')
    parser.add_argument('folder', metavar='OUT_DIR', help='folder written by `epsanet convert`')
    parser.add_argument('repo_id', metavar='REPO_ID', help='Hub model repo, e.g. my-org/epsanet50.in1k')
    parser.add_argument('--private', action='store_true', help='create the repo as private')
    parser.add_argument('--revision', default=None, help='branch to push to (created if absent; default main)')
    parser.add_argument('--tag', default=None, help='registry tag (overrides the one given to convert)')
    parser.add_argument('--commit-message', default=None)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..weights.loading import WeightsError
    from ..weights.publish import push
    from . import CLIError

    try:
        result = push(args.folder, args.repo_id, private=args.private, revision=args.revision, tag=args.tag,
                      commit_message=args.commit_message)
    except WeightsError as e:
        raise CLIError(str(e)) from e
    print(f'Uploaded to {result.commit_url}')
    print('Registry entry for weights/registry.json ("weights" list):')
    print(json.dumps(result.entry, indent=2))
    if result.problems:
        print('Before adding it, complete: ' + '; '.join(result.problems))
    return 0
