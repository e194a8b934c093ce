from ddil_cli.cli.app import main

main()
