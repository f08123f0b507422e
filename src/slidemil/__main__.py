from slidemil.cli import main

main()
