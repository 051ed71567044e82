from crushd.cli import main

main()
