from runner.cli import main

main(prog_name="a6-runner")
