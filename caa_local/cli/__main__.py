from caa_local.cli import main

main()
