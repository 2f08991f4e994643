from glmtune.cli.main import main

main()
