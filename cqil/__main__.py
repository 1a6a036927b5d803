from cqil.cli import main

main()
