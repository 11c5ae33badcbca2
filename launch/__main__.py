from launch.commands.cli import main

main()
